"""The evaluation's ``centralized`` row: what federation costs. The same model, config, optimizer and
schedule, trained by our own local training loop on the pooled training data of all clients, for the
same total number of optimizer steps x batch as the federated run (read from its metrics.jsonl), in
the same segments (one per federated round, a fresh AdamW each, as every client starts each round),
with the pooled validation masked accuracy after each: the learning curve against compute.

Pooling the data also pools the targets: one k-means on the pooled training frames (what a
centralized HuBERT does), instead of one per client. The model starts from the same seeded
initialisation as the federated run's round 0. A next iteration (kmeans.features hubert,
federation.init_checkpoint) is repeated without federation too: the pooled frames are clustered in
the last iteration's *centralized* model's features and training starts from its encoder
(evaluation.centralized_init), so each iteration of both rows has the same compute. Its checkpoint
is cached under the evaluation folder and reused while the config, the budget, the pooled data, the
checkpoints it starts from and the package's code stay the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedhubert.checkpoint import read_checkpoint, save_checkpoint
from fedhubert.config import Config, config_from_dict
from fedhubert.data import derive_seed, majority_share, make_loader, read_manifest
from fedhubert.errors import ConfigError, DataError
from fedhubert.fileio import atomic_write_text, file_sha1, package_sha1
from fedhubert.partition import SPLITS
from fedhubert.train import evaluate_local, resolve_device, train_local

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """Training compute of a federated run: optimizer steps and crops seen over all clients, in total
    and per round (the centralized run trains in the same segments, a fresh optimizer each, as clients do)."""
    steps: int
    examples: int
    round_steps: list[int]

    @property
    def batch_size(self) -> int:
        return max(1, round(self.examples / self.steps)) if self.steps else 0


def federated_budget(metrics_jsonl: Path, up_to_round: int | None = None) -> Budget:
    """Steps and examples summed over every client of every training round of ``metrics.jsonl`` (of
    rounds 1..``up_to_round`` only, when given)."""
    if not metrics_jsonl.is_file():
        raise DataError(f"{metrics_jsonl} not found: run the federated stage with the same config first")
    steps = examples = 0
    round_steps = []
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if up_to_round is not None and int(record.get("round", 0)) > up_to_round:
            continue
        clients = record.get("client_train", {}).values()
        if clients:
            round_steps.append(sum(int(c.get("steps", 0)) for c in clients))
            examples += sum(int(c.get("num-examples", 0)) for c in clients)
    steps = sum(round_steps)
    return Budget(steps, examples, round_steps)


def pool_clients(cfg: Config, out: Path) -> Path:
    """``out/client_0/{train,valid}.tsv``: every client's split concatenated (one shared audio root)."""
    parts, target = Path(cfg.data.partitions_dir), out / "client_0"
    for split in SPLITS:
        roots, lines = set(), []
        for k in range(cfg.partition.num_clients):
            tsv = parts / f"client_{k}" / f"{split}.tsv"
            root, paths, sizes = read_manifest(tsv)
            roots.add(str(root))
            lines += [f"{p}\t{n}" for p, n in zip(paths, sizes)]
        if len(roots) != 1:
            raise DataError(f"the clients' {split}.tsv files under {parts} name different audio roots {sorted(roots)}; "
                            "the centralized baseline needs the corpus in one place")
        text = "\n".join([roots.pop(), *lines]) + "\n"
        path = target / f"{split}.tsv"
        if not path.is_file() or path.read_text() != text:  # unchanged manifests keep their targets
            for stale in ("train.km", "valid.km", "kmeans.joblib", "targets.fingerprint"):
                (target / stale).unlink(missing_ok=True)
            atomic_write_text(path, text)
    return target


def _sources(cfg: Config) -> list[str]:
    """SHA-1s of the checkpoints a next iteration clusters and starts from ('' for none)."""
    return [file_sha1(Path(p)) if p else "" for p in (cfg.kmeans.checkpoint, cfg.federation.init_checkpoint)]


def _fingerprint(cfg: Config, budget: Budget, pooled: Path) -> str:
    keys = {name: cfg.to_dict()[name] for name in ("seed", "data", "kmeans", "model", "training")}
    keys["budget"] = [budget.round_steps, budget.batch_size]
    keys["init"] = _sources(cfg)
    keys["manifests"] = [(pooled / f"{s}.tsv").read_text() for s in SPLITS]
    keys["code"] = package_sha1()  # a fix to training or features must not be hidden by a stale model
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def pooled_config(cfg: Config, pooled_parts: Path) -> Config:
    """``cfg`` pointed at the pooled partition (one client)."""
    values = cfg.to_dict()
    values["data"]["partitions_dir"] = str(pooled_parts)
    values["partition"]["num_clients"] = 1
    values["kmeans"]["codebook"] = "local"  # one client: its k-means is the pooled data's one codebook
    for key in ("min_fit_clients", "min_evaluate_clients", "min_available_clients"):
        values["federation"][key] = 1
    return config_from_dict(values)


def _point(examples: int, model: torch.nn.Module, valid: DataLoader, cfg: Config, device: torch.device
           ) -> dict[str, float]:
    """One point of the learning curve: crops trained on so far, validation masked accuracy and loss,
    and the chance level (majority-cluster share) of the pooled validation labels."""
    metrics = evaluate_local(model, valid, cfg, device)
    return {"examples": examples, "masked_accuracy": metrics["masked_accuracy"], "loss": metrics["loss"],
            "chance": majority_share(valid.dataset.labels)}


def next_iteration(cfg: Config, pcfg: Config) -> None:
    """Points the pooled config of a next-iteration run at the last iteration's *centralized* model
    (evaluation.centralized_init) wherever the federated run uses its federated model: the features
    clustered (kmeans.checkpoint) and the round-0 encoder (federation.init_checkpoint). So the
    centralized row repeats the whole recipe without federation, at the same compute per iteration."""
    uses = [key for key, used in (("kmeans.checkpoint", cfg.kmeans.features == "hubert"),
                                  ("federation.init_checkpoint", bool(cfg.federation.init_checkpoint))) if used]
    if not uses:
        return
    init = cfg.evaluation.centralized_init
    if not init:
        raise ConfigError(f"evaluation.centralized_init is empty, but this run continues another ({' and '.join(uses)} "
                          "set): the centralized row needs that iteration's centralized model, e.g. "
                          "<its evaluation.output_dir>/centralized/model.pt (or leave out the centralized row)")
    if not Path(init).is_file():
        raise DataError(f"evaluation.centralized_init not found: {init} (evaluate the last iteration with its "
                        "centralized row first)")
    if "kmeans.checkpoint" in uses:
        pcfg.kmeans.checkpoint = str(init)
    if "federation.init_checkpoint" in uses:
        pcfg.federation.init_checkpoint = str(init)


def train_centralized(cfg: Config, out_dir: Path, budget: Budget) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, info) of the centralized model for ``budget``; trained unless cached."""
    from fedhubert.federation.tasks import init_from_checkpoint
    from fedhubert.features import feature_threads, make_features
    from fedhubert.targets import client_targets

    if budget.steps == 0:
        raise DataError("the federated run records no training steps: nothing to match")
    parts = out_dir / "partitions"
    pooled = pool_clients(cfg, parts)
    pcfg = pooled_config(cfg, parts)
    next_iteration(cfg, pcfg)
    checkpoint = out_dir / "model.pt"
    fingerprint = _fingerprint(pcfg, budget, pooled)
    if checkpoint.is_file() and read_checkpoint(checkpoint).get("fingerprint") == fingerprint:
        log.info("centralized: reusing %s (same config, budget, data and code)", checkpoint)
        return checkpoint, read_checkpoint(checkpoint)["info"]
    labels_made_by = pooled / "targets.fingerprint"  # other features or k-means keys: new labels
    labels_key = hashlib.sha1(json.dumps([pcfg.to_dict()["kmeans"], pcfg.seed, _sources(pcfg),
                                          package_sha1()]).encode()).hexdigest()
    if not (pooled / "train.km").is_file() or not labels_made_by.is_file() or labels_made_by.read_text() != labels_key:
        features = make_features(pcfg)
        with feature_threads(features):
            client_targets(pcfg, 0, features)
        atomic_write_text(labels_made_by, labels_key)

    batch, device = budget.batch_size, resolve_device(cfg.training.device)
    # the federated run's round-0 model: seeded, or (next iteration) the last centralized encoder
    model = init_from_checkpoint(pcfg)[0]
    log.info("centralized: %d steps of batch %d in %d segments on the pooled data (the federated budget)",
             budget.steps, batch, len(budget.round_steps))
    valid = make_loader(pooled, "valid", pcfg, batch_size=4, seed=cfg.seed, train=False)
    curve = [_point(0, model, valid, pcfg, device)]
    examples = 0
    for segment, steps in enumerate(budget.round_steps, start=1):
        seed = derive_seed(cfg.seed, "centralized", segment)
        loader = make_loader(pooled, "train", pcfg, batch_size=batch, seed=seed, train=True)
        pcfg.training.max_local_steps = steps
        pcfg.training.local_epochs = math.ceil(steps / len(loader))
        metrics = train_local(model, loader, pcfg, device, seed=seed)
        examples += int(metrics["num_examples"])
        curve.append(_point(examples, model, valid, pcfg, device))
    info = {"steps": budget.steps, "examples": examples, "batch_size": batch, "curve": curve}
    save_checkpoint(checkpoint, model, pcfg, fingerprint=fingerprint, info=info)
    return checkpoint, info
