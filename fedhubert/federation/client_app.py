"""The ClientApp: local HuBERT training and validation on one client's partition.

A client receives the global encoder, puts its own prediction head on top (its k-means ids mean
something on this client alone), trains, keeps the new head, and sends back the encoder only.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhubert.config import Config
from fedhubert.data import derive_seed, make_loader, read_manifest
from fedhubert.federation.task import (build_model, client_checkpoint_dir, client_data_dir, config_from_record,
                                       decode_arrays, encode_arrays, load_encoder, split_state)
from fedhubert.fileio import atomic_path
from fedhubert.train import evaluate_local, resolve_batch_size, resolve_device, train_local

log = logging.getLogger(__name__)
HEAD_FILE = re.compile(r"head_round_(\d+)\.pt$")


class HeadStore:
    """The client's prediction head per round: in the node's persistent state (between rounds of a
    run) and in ``<client checkpoint dir>/head_round_<r>.pt`` (across runs, for --resume)."""

    def __init__(self, folder: Path, context: Context, keep: int) -> None:
        self.folder, self.state, self.keep = folder, context.state, keep

    def _on_disk(self) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.folder.glob("head_round_*.pt")
                      if (m := HEAD_FILE.search(p.name)))

    def latest(self, up_to: int) -> dict[str, torch.Tensor] | None:
        """The newest head saved at a round <= ``up_to``; None means: use the seeded initial head."""
        saved = [(rnd, path) for rnd, path in self._on_disk() if rnd <= up_to]
        if not saved:
            return None
        rnd, path = saved[-1]
        if "head" in self.state and int(self.state["head-meta"]["round"]) == rnd:
            return self.state["head"].to_torch_state_dict()  # this run saved it: no need to read the file
        return torch.load(path, map_location="cpu", weights_only=True)["head"]

    def save(self, rnd: int, head: dict[str, torch.Tensor]) -> None:
        head = {k: v.detach().cpu().clone() for k, v in head.items()}
        self.state["head"] = ArrayRecord(head)
        self.state["head-meta"] = ConfigRecord({"round": rnd})
        with atomic_path(self.folder / f"head_round_{rnd}.pt") as tmp:
            torch.save({"round": rnd, "head": head}, tmp)
        for _, old in self._on_disk()[:-self.keep]:
            old.unlink(missing_ok=True)


def _prepare(msg: Message, context: Context, head_up_to_offset: int):
    """Config, ids, paths and the model with the global encoder and this client's head."""
    cfg: Config = config_from_record(msg.content["config"])
    partition_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    torch.set_num_threads(max(1, int(cfg.federation.client_num_cpus)))

    model = build_model(cfg)
    load_encoder(model, decode_arrays(msg.content["arrays"]))
    heads = HeadStore(client_checkpoint_dir(cfg, partition_id, context.node_config), context,
                      cfg.federation.keep_last_checkpoints)
    head = heads.latest(up_to=server_round + head_up_to_offset)
    if head is not None:
        model.load_state_dict(head, strict=False)
    data_dir = client_data_dir(cfg, partition_id, context.node_config)
    return cfg, partition_id, server_round, model, heads, data_dir


def _batch_size(cfg: Config, model: torch.nn.Module, device: torch.device, context: Context,
                data_dir: Path) -> int:
    """cfg.training.batch_size, or for 'auto' the probed size, probed once per node and remembered."""
    if "batch" not in context.state:
        num_train = len(read_manifest(data_dir / "train.tsv")[1])
        size = resolve_batch_size(cfg, model, device, num_examples=num_train)
        context.state["batch"] = ConfigRecord({"size": size})
    return int(context.state["batch"]["size"])


def _metrics(metrics: dict[str, float], partition_id: int) -> MetricRecord:
    values = {k: float(v) for k, v in metrics.items() if k != "num_examples"}
    values["num-examples"] = int(metrics["num_examples"])  # Flower's weighting key
    values["partition-id"] = partition_id
    return MetricRecord(values)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # The head this client trained last (round r - 1 or earlier); the encoder is this round's global one.
    cfg, pid, rnd, model, heads, data_dir = _prepare(msg, context, head_up_to_offset=-1)
    device = resolve_device(cfg.training.device)
    seed = derive_seed(cfg.seed, rnd, pid)
    loader = make_loader(data_dir, "train", cfg, batch_size=_batch_size(cfg, model, device, context, data_dir),
                         seed=seed, train=True)
    metrics = train_local(model, loader, cfg, device, seed=seed)
    encoder, head = split_state(model)
    heads.save(rnd, head)
    content = RecordDict({"arrays": encode_arrays(encoder, cfg.federation.wire_dtype),
                          "metrics": _metrics(metrics, pid)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    # Validation after round r uses the head trained in round r (or the newest before it).
    cfg, pid, rnd, model, _, data_dir = _prepare(msg, context, head_up_to_offset=0)
    device = resolve_device(cfg.training.device)
    loader = make_loader(data_dir, "valid", cfg, batch_size=_batch_size(cfg, model, device, context, data_dir),
                         seed=cfg.seed, train=False)
    metrics = evaluate_local(model, loader, cfg, device)
    return Message(content=RecordDict({"metrics": _metrics(metrics, pid)}), reply_to=msg)
