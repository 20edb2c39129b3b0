"""What the ServerApp and the ClientApp share: which weights travel, how they are encoded on the wire,
how the run's config travels with the messages, and where a client keeps its files.

Which weights stay on the client is a task's ``is_local`` (see tasks.py), derived from the codebook
mode by :func:`head_is_federated` alone. With ``kmeans.codebook: local`` each client's k-means ids mean
something on that client alone, so the prediction head (``final_proj`` and ``label_embs_concat``) is
client state and is never averaged: only the encoder travels. With ``federated`` every client's ids come
from one shared codebook, so the head means the same everywhere and travels with the encoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedhubert.config import Config, config_from_dict
from fedhubert.errors import FederationError
from fedhubert.fileio import file_sha1  # noqa: F401 - re-exported: tasks.py and the tests import it from here
from fedhubert.model import HEAD_PARAM_PREFIXES, HubertBase

CONFIG_KEY = "fedhubert-config"  # the run's Config as JSON, inside every message's ConfigRecord
TASK_KEY = "fedhubert-task"      # which federated task (pretraining, distillation) a message is for
BEST_ROUND_KEY = "best-round"    # the round of the best global model so far: clients keep its head
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_head_param(name: str) -> bool:
    """True for the prediction head (``final_proj``, ``label_embs_concat``), whatever the codebook mode."""
    return name.startswith(HEAD_PARAM_PREFIXES)


def head_is_federated(cfg: Config) -> bool:
    """The one place that decides whether the prediction head travels: with ``kmeans.codebook:
    federated`` all clients label with one codebook, so the head is aggregated with the encoder;
    with ``local`` each client's ids are its own, so its head never leaves it. The tasks' ``is_local``
    (client and server alike) and the later stages (distillation's teacher head, the evaluation's
    masked prediction) all ask this, of the config the model was trained with."""
    return cfg.kmeans.codebook == "federated"


def split_state(model: torch.nn.Module, is_local: Callable[[str], bool] = is_head_param
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, local) halves of the model's state dict: what travels and what stays on the client."""
    shared, local = {}, {}
    for name, tensor in model.state_dict().items():
        (local if is_local(name) else shared)[name] = tensor
    return shared, local


def load_encoder(model: torch.nn.Module, shared: dict[str, torch.Tensor],
                 is_local: Callable[[str], bool] = is_head_param) -> None:
    """Loads the shared weights into ``model``, leaving its local ones as they are; any other mismatch is an error."""
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or not all(is_local(k) for k in missing):
        raise FederationError(f"global arrays do not match the model: missing {missing}, unexpected {unexpected}")


def build_model(cfg: Config) -> HubertBase:
    """The seeded initial model: the server and every client build the same one from the same seed."""
    torch.manual_seed(cfg.seed)
    return HubertBase.from_config(cfg)


def encode_arrays(state: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """Tensors → ArrayRecord in the wire dtype. numpy has no bfloat16, so bfloat16 travels as its
    raw 16-bit pattern (uint16) and is recognised by that dtype on arrival."""
    dtype = WIRE_DTYPES[wire_dtype]
    arrays = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
            if dtype == torch.bfloat16:
                t = t.view(torch.uint16)
        arrays[name] = Array(t.contiguous().numpy())
    return ArrayRecord(arrays)


def decode_array(array: Array | np.ndarray) -> np.ndarray:
    """An array from the wire as float32 numpy (integer buffers other than bfloat16 pass unchanged)."""
    values = array.numpy() if isinstance(array, Array) else array
    if values.dtype == np.uint16:
        return torch.from_numpy(values.copy()).view(torch.bfloat16).float().numpy()
    if values.dtype in (np.float16, np.float64):
        return values.astype(np.float32)
    return values


def decode_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(decode_array(array).copy()) for name, array in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (numel × itemsize), without serialisation headers."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values()))


def config_record(cfg: Config, **extra: int | float | str | bool) -> ConfigRecord:
    """The ConfigRecord every message carries: the whole run config plus per-round values."""
    return ConfigRecord({CONFIG_KEY: json.dumps(cfg.to_dict()), **extra})


def config_from_record(record: ConfigRecord) -> Config:
    return config_from_dict(json.loads(str(record[CONFIG_KEY])))


def node_path(node_config: dict, key: str) -> Path | None:
    """A path from the SuperNode's ``--node-config`` (e.g. ``data-path``), None when it is not given.
    ``~`` is the SuperNode machine's home; a relative path is relative to the folder the SuperNode was
    started in (its ClientApp processes run there)."""
    value = node_config.get(key)
    return Path(str(value)).expanduser().resolve() if value else None


def client_data_dir(cfg: Config, partition_id: int, node_config: dict) -> Path:
    """A client's data folder: the node's ``data-path`` (deployment) or the partition's folder."""
    return node_path(node_config, "data-path") or Path(cfg.data.partitions_dir) / f"client_{partition_id}"


def node_heads_dir(node_config: dict) -> Path | None:
    """Where a SuperNode keeps its own heads: its ``checkpoint-path``, else ``<data-path>/heads``; None
    in a simulation (no data-path). Never a path of the server's: the ServerApp's checkpoint folder is
    on another machine."""
    data = node_path(node_config, "data-path")
    return node_path(node_config, "checkpoint-path") or (data / "heads" if data else None)


def client_checkpoint_dir(checkpoint_dir: str | Path, partition_id: int, node_config: dict) -> Path:
    """Where a client keeps its own heads (kmeans.codebook=local) between rounds and runs: on a
    SuperNode, :func:`node_heads_dir`; in a simulation ``<checkpoint_dir>/clients/client_<k>`` of the run."""
    return node_heads_dir(node_config) or Path(checkpoint_dir) / "clients" / f"client_{partition_id}"


def head_files(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """(round, path) of every ``<prefix>_round_<r>.pt`` in ``folder``, oldest first."""
    pattern = re.compile(rf"{re.escape(prefix)}_round_(\d+)\.pt")
    found = [(int(m.group(1)), p) for p in folder.glob(f"{prefix}_round_*.pt") if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def _absolute(path: str) -> str:
    """``~`` expanded (the home of the machine the ServerApp runs on), then relative to the current folder."""
    return str(Path(path).expanduser().resolve())


def absolutize_paths(cfg: Config) -> Config:
    """Makes the config's paths absolute (``~`` expanded, relative ones against the folder the command, or
    under ``flwr run`` the SuperLink, runs in), so that clients in other processes find the same files."""
    cfg.data.librispeech_root = _absolute(cfg.data.librispeech_root)
    cfg.data.partitions_dir = _absolute(cfg.data.partitions_dir)
    cfg.federation.checkpoint_dir = _absolute(cfg.federation.checkpoint_dir)
    for section, key in ((cfg.kmeans, "checkpoint"), (cfg.federation, "init_checkpoint")):
        if getattr(section, key):  # empty means "none", not the current folder
            setattr(section, key, _absolute(getattr(section, key)))
    d = cfg.distillation
    d.teacher_model_path = _absolute(d.teacher_model_path)
    d.checkpoint_dir = _absolute(d.checkpoint_dir)
    if d.teacher_heads_dir:
        d.teacher_heads_dir = _absolute(d.teacher_heads_dir)
    return cfg


def targets_fingerprint(data_dir: Path) -> str:
    """SHA-1 of a client's ``train.km``: a head trained on these labels records it, so that a later
    stage can tell when the labels changed under it (re-run k-means: the head's ids mean other sounds)."""
    return file_sha1(data_dir / "train.km")
