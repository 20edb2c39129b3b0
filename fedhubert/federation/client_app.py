"""The ClientApp: local training and validation on one client's partition, for every federated task.

A client receives the global weights, puts its own local weights on top (with kmeans.codebook=local
its prediction head: its k-means ids mean something on this client alone), trains with the task's
loss, keeps the new local weights, and sends back the shared ones only. With kmeans.codebook=federated
nothing is local (the head travels too: task.head_is_federated), so no head is kept or written. The
message's config names the task (tasks.py).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhubert.checkpoint import load_plain
from fedhubert.config import Config
from fedhubert.data import derive_seed, majority_share, make_loader, read_manifest
from fedhubert.federation import kmeans_app
from fedhubert.federation.privacy import client_clipping_mod
from fedhubert.federation.task import (BEST_ROUND_KEY, TASK_KEY, client_data_dir, config_from_record, decode_arrays,
                                       encode_arrays, head_files, load_encoder, split_state, targets_fingerprint)
from fedhubert.federation.tasks import FederatedTask, get_task
from fedhubert.fileio import atomic_path
from fedhubert.health import HealthMeter
from fedhubert.train import evaluate_local, resolve_batch_size, resolve_device, train_local

log = logging.getLogger(__name__)


class HeadStore:
    """The client's local weights per round, in ``<client checkpoint dir>/<prefix>_round_<r>.pt`` only
    (between rounds, across runs for --resume, and for a later stage: distillation's teacher uses the
    head of the best global model's round). Never in the node's ``context.state``: a simulation keeps
    every virtual node's state in its own process for the whole run and ships it to the actor and back
    on every call, so 2,338 clients with a Base-size head (1.3 MB) there would hold ~3 GB."""

    def __init__(self, folder: Path, keep: int, prefix: str) -> None:
        self.folder, self.keep, self.prefix = folder, keep, prefix

    def latest(self, up_to: int) -> dict[str, torch.Tensor] | None:
        """The newest head saved at a round <= ``up_to``; None means: use the seeded initial head."""
        saved = [(rnd, path) for rnd, path in head_files(self.folder, self.prefix) if rnd <= up_to]
        return load_plain(saved[-1][1])["head"] if saved else None

    def save(self, rnd: int, head: dict[str, torch.Tensor], *, keep_round: int, targets_sha1: str) -> None:
        """Writes round ``rnd``'s head; keeps the newest ``keep`` files, the one of ``keep_round`` (the
        best global model's round so far) and the newest before ``rnd``, deletes the others."""
        head = {k: v.detach().cpu().clone() for k, v in head.items()}
        with atomic_path(self.folder / f"{self.prefix}_round_{rnd}.pt") as tmp:
            torch.save({"round": rnd, "head": head, "targets_sha1": targets_sha1}, tmp)
        saved = head_files(self.folder, self.prefix)
        # The server writes round_<rnd>.pt only after every client's reply: a server killed before that
        # resumes from round rnd - 1, whose training starts from this client's newest head before rnd.
        needed = {keep_round, max((r for r, _ in saved if r < rnd), default=-1)}
        for old_round, old in saved[:-self.keep]:
            if old_round not in needed:
                old.unlink(missing_ok=True)


def _prepare(msg: Message, context: Context, head_up_to_offset: int):
    """Task, config, ids, paths and the model with the global weights and this client's local ones."""
    record = msg.content["config"]
    task: FederatedTask = get_task(str(record[TASK_KEY]))
    cfg: Config = config_from_record(record)
    partition_id = int(context.node_config["partition-id"])
    server_round = int(record["server-round"])
    torch.set_num_threads(max(1, int(cfg.federation.client_num_cpus)))

    model = task.client_model(cfg, context.node_config)
    is_local = functools.partial(task.is_local, cfg)
    load_encoder(model, decode_arrays(msg.content["arrays"]), is_local)
    heads = None  # nothing of this client's own to keep (a federated head): no head files
    if task.has_local(cfg, model):
        heads = HeadStore(task.client_dir(cfg, partition_id, context.node_config),
                          cfg.federation.keep_last_checkpoints, task.head_prefix)
        head = heads.latest(up_to=server_round + head_up_to_offset)
        if head is not None:
            model.load_state_dict(head, strict=False)
    data_dir = client_data_dir(cfg, partition_id, context.node_config)
    return task, cfg, partition_id, server_round, model, heads, data_dir


def _batch_size(cfg: Config, model: torch.nn.Module, device: torch.device, context: Context,
                data_dir: Path, loss_fn) -> int:
    """cfg.training.batch_size, or for 'auto' the probed size, probed once per node and remembered."""
    if "batch" not in context.state:
        num_train = len(read_manifest(data_dir / "train.tsv")[1])
        size = resolve_batch_size(cfg, model, device, num_examples=num_train, loss_fn=loss_fn)
        context.state["batch"] = ConfigRecord({"size": size})
    return int(context.state["batch"]["size"])


def _metrics(metrics: dict[str, float], partition_id: int) -> MetricRecord:
    values = {k: float(v) for k, v in metrics.items() if k != "num_examples"}
    values["num-examples"] = int(metrics["num_examples"])  # Flower's weighting key
    values["partition-id"] = partition_id
    return MetricRecord(values)


app = ClientApp()


@app.train(mods=[client_clipping_mod])  # privacy.clipping=client: the update leaves this client clipped
def train(msg: Message, context: Context) -> Message:
    # The head this client trained last (round r - 1 or earlier); the encoder is this round's global one.
    task, cfg, pid, rnd, model, heads, data_dir = _prepare(msg, context, head_up_to_offset=-1)
    device = resolve_device(cfg.training.device)
    seed = derive_seed(cfg.seed, rnd, pid)
    loss_fn = task.client_loss(cfg, pid, context.node_config, data_dir, device)
    batch_size = _batch_size(cfg, model, device, context, data_dir, loss_fn)
    loader = make_loader(data_dir, "train", cfg, batch_size=batch_size, seed=seed, train=True)
    metrics = train_local(model, loader, cfg, device, seed=seed, loss_fn=loss_fn)
    shared, local = split_state(model, functools.partial(task.is_local, cfg))
    if heads is not None:
        heads.save(rnd, local, keep_round=int(msg.content["config"].get(BEST_ROUND_KEY, -1)),
                   targets_sha1=targets_fingerprint(data_dir))
    content = RecordDict({"arrays": encode_arrays(shared, cfg.federation.wire_dtype),
                          "metrics": _metrics(metrics, pid)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    # Validation after round r uses the head trained in round r (or the newest before it).
    task, cfg, pid, rnd, model, _, data_dir = _prepare(msg, context, head_up_to_offset=0)
    device = resolve_device(cfg.training.device)
    loss_fn = task.client_loss(cfg, pid, context.node_config, data_dir, device)
    batch_size = _batch_size(cfg, model, device, context, data_dir, loss_fn)
    loader = make_loader(data_dir, "valid", cfg, batch_size=batch_size, seed=cfg.seed, train=False)
    # what the validation loss cannot see, measured in the same pass: is the shared encoder collapsing?
    health = HealthMeter(getattr(model, "student", model), seed=cfg.seed)
    metrics = evaluate_local(model, loader, cfg, device, loss_fn=loss_fn, observe=health.update)
    metrics.update(health.result())
    metrics["masked_chance"] = majority_share(loader.dataset.labels)
    return Message(content=RecordDict({"metrics": _metrics(metrics, pid)}), reply_to=msg)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """This node's partition: the server samples clients in partition order (sampling.PartitionOrder)."""
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# kmeans.codebook=federated: the federated k-means (kmeans_app.py) answers on this same ClientApp, so one
# app declaration serves every task (`flwr run . --run-config 'task="kmeans"'`).
app.train("kmeans_init")(kmeans_app.kmeans_init)
app.train("kmeans_stats")(kmeans_app.kmeans_stats)
app.query("kmeans_label")(kmeans_app.kmeans_label)
