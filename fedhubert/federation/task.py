"""What the ServerApp and the ClientApp share: which weights travel, how they are encoded on the wire,
how the run's config travels with the messages, and where a client keeps its files.

Only the encoder travels. Each client's k-means ids mean something on that client alone, so the
prediction head (``final_proj`` and ``label_embs_concat``) is client state and is never averaged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedhubert.config import Config, config_from_dict
from fedhubert.errors import FederationError
from fedhubert.model import HEAD_PARAM_PREFIXES, HubertBase

CONFIG_KEY = "fedhubert-config"  # the run's Config as JSON, inside every message's ConfigRecord
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_head_param(name: str) -> bool:
    """True for the client-specific prediction head, which never leaves its client."""
    return name.startswith(HEAD_PARAM_PREFIXES)


def split_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, head) halves of the model's state dict."""
    encoder, head = {}, {}
    for name, tensor in model.state_dict().items():
        (head if is_head_param(name) else encoder)[name] = tensor
    return encoder, head


def load_encoder(model: torch.nn.Module, encoder: dict[str, torch.Tensor]) -> None:
    """Loads the encoder weights into ``model``, leaving its head as it is; any other mismatch is an error."""
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if unexpected or not all(is_head_param(k) for k in missing):
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


def client_data_dir(cfg: Config, partition_id: int, node_config: dict) -> Path:
    """A client's data folder: the node's ``data-path`` (deployment) or the partition's folder."""
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"]))
    return Path(cfg.data.partitions_dir) / f"client_{partition_id}"


def client_checkpoint_dir(cfg: Config, partition_id: int, node_config: dict) -> Path:
    """Where a client keeps its own prediction head between rounds and runs."""
    if node_config.get("checkpoint-path"):
        return Path(str(node_config["checkpoint-path"]))
    return Path(cfg.federation.checkpoint_dir) / "clients" / f"client_{partition_id}"


def absolutize_paths(cfg: Config) -> Config:
    """Makes the config's paths absolute, so that clients in other processes find the same files."""
    cfg.data.librispeech_root = str(Path(cfg.data.librispeech_root).resolve())
    cfg.data.partitions_dir = str(Path(cfg.data.partitions_dir).resolve())
    cfg.federation.checkpoint_dir = str(Path(cfg.federation.checkpoint_dir).resolve())
    return cfg
