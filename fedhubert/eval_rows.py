"""The rows of the evaluation table and the run that fills it (``evaluate.py``).

- ``federated``: the best global model of the pretraining;
- ``centralized``: the same model and budget trained on the pooled data (centralized.py);
- ``student``: the best distilled student, when the distillation has run;
- ``random-init``: the same architecture, seeded as the federated run's round 0;
- ``mfcc``: 39-d MFCC mean and standard deviation, the floor every pretrained model must beat.

Training compute is crops trained on x the crop length (``data.max_audio_length``), in audio hours;
the student's counts only its own distillation steps, not its teacher's pretraining.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedhubert.centralized import federated_budget, train_centralized
from fedhubert.checkpoint import load_checkpoint, save_checkpoint
from fedhubert.config import NUM_SPECIAL_SYMBOLS, Config
from fedhubert.data import check_client_data, majority_share, make_loader, read_labels, read_manifest
from fedhubert.distill import STUDENT
from fedhubert.errors import DataError
from fedhubert.eval_sets import ProbeSet, keyword_set, speaker_set
from fedhubert.evaluate import best_checkpoint, probe_row, row_features
from fedhubert.federation.task import build_model, head_is_federated, is_head_param
from fedhubert.federation.tasks import DistillationTask, FederatedTask, saved_head
from fedhubert.model import HubertBase
from fedhubert.probes import label_perplexity, read_alignments, unit_quality
from fedhubert.train import evaluate_local, resolve_device

log = logging.getLogger(__name__)
ROWS = ("federated", "centralized", "student", "random-init", "mfcc")


@dataclass
class RowSpec:
    name: str
    checkpoint: Path | None  # None: MFCC statistics
    examples: int            # crops trained on
    masked: Callable[[], dict[str, Any]] | None  # masked prediction on validation speech, if it has a head
    curve: list[dict[str, float]] | None = None  # validation masked accuracy against crops trained on


# --- masked prediction ---------------------------------------------------------------------------------

def masked_prediction(model: HubertBase, cfg: Config, clients: list[tuple[Path, dict | None]],
                      split: str = "valid") -> dict[str, Any]:
    """Masked accuracy and loss (cross-entropy per masked frame) on each (client folder, its head)
    ``split``, seeded masks; the head None keeps the model's own. Returns the frame-weighted means, the
    chance level and per-client figures."""
    per_client = []
    for folder, head in clients:
        scored = model
        if head is not None:
            scored = HubertBase.from_config(cfg)
            scored.load_state_dict({**model.state_dict(), **head})
        loader = make_loader(folder, split, cfg, batch_size=4, seed=cfg.seed, train=False)
        metrics = evaluate_local(scored, loader, cfg, "cpu")
        per_client.append({"client": folder.name, "masked_accuracy": metrics["masked_accuracy"],
                           "masked_loss": metrics.get("masked_loss", 0.0), "num_masked": metrics.get("num_masked", 0.0),
                           "chance": majority_share(loader.dataset.labels)})
    weights = np.array([c["num_masked"] for c in per_client]) + 1e-12
    mean = lambda key: float(np.average([c[key] for c in per_client], weights=weights))  # noqa: E731
    return {"masked_accuracy": mean("masked_accuracy"), "masked_loss": mean("masked_loss"), "chance": mean("chance"),
            "per_client": per_client}


def _client_heads(cfg: Config, folder_of: Callable[[int], Path], prefix: str, best_round: int
                  ) -> list[tuple[Path, dict | None]]:
    clients = []
    for k in range(cfg.partition.num_clients):
        found = saved_head(folder_of(k), prefix, best_round)
        if found is None:
            log.warning("masked prediction: no %s_round_<r>.pt (r <= %d) in %s; client %d left out",
                        prefix, best_round, folder_of(k), k)
            continue
        # a student's local weights are named inside DistillationModel ("student.final_proj...")
        head = {name.removeprefix(STUDENT): tensor for name, tensor in found[1]["head"].items()}
        clients.append((Path(cfg.data.partitions_dir) / f"client_{k}", head))
    return clients


def _masked_with_heads(checkpoint: Path, cfg: Config, task: FederatedTask) -> Callable[[], dict[str, Any]]:
    """Masked prediction of a federated checkpoint: with its own (aggregated) head when it was trained
    with kmeans.codebook=federated, else with each client's head of its round (or the newest before)."""
    def run() -> dict[str, Any]:
        model, model_cfg, extras = load_checkpoint(checkpoint)
        if head_is_federated(model_cfg):
            parts = Path(cfg.data.partitions_dir)
            return masked_prediction(model, model_cfg, [(parts / f"client_{k}", None)
                                                        for k in range(cfg.partition.num_clients)])
        folder = lambda k: task.client_dir(cfg, k, {})  # noqa: E731
        return masked_prediction(model, model_cfg, _client_heads(cfg, folder, task.head_prefix, int(extras["round"])))
    return run


# --- rows ----------------------------------------------------------------------------------------------

def round_checkpoint(cfg: Config, rnd: int) -> Path:
    """``server/round_<rnd>.pt`` of the config's pretraining; one line naming the rounds kept if it is gone."""
    server = Path(cfg.federation.checkpoint_dir) / "server"
    path = server / f"round_{rnd}.pt"
    if not path.is_file():
        kept = sorted(int(p.stem.removeprefix("round_")) for p in server.glob("round_*.pt")
                      if p.stem.removeprefix("round_").isdigit())
        raise DataError(f"--round {rnd}: {path} not found (rounds kept: {kept or 'none'}; "
                        "federation.keep_last_checkpoints sets how many)")
    return path


def row_specs(cfg: Config, out: Path, rows: list[str], federated_round: int | None = None) -> list[RowSpec]:
    """What each requested row evaluates; trains the centralized baseline when it is asked for. The
    federated row is the best global model, or with ``federated_round`` that round's global model
    (and its clients' heads); its compute, and the centralized row's, are then rounds 1..that round."""
    federated = best_checkpoint(cfg) if federated_round is None else round_checkpoint(cfg, federated_round)
    budget = federated_budget(Path(cfg.federation.checkpoint_dir) / "metrics.jsonl", federated_round)
    specs = []
    for name in rows:
        if name == "federated":
            specs.append(RowSpec(name, federated, budget.examples, _masked_with_heads(federated, cfg, FederatedTask()),
                                 federated_curve(Path(cfg.federation.checkpoint_dir) / "metrics.jsonl")))
        elif name == "centralized":
            ckpt, info = train_centralized(cfg, out / "centralized", budget)
            pooled = out / "centralized" / "partitions" / "client_0"

            def masked(ckpt: Path = ckpt, pooled: Path = pooled) -> dict[str, Any]:
                model, model_cfg, _ = load_checkpoint(ckpt)
                return masked_prediction(model, model_cfg, [(pooled, None)])
            specs.append(RowSpec(name, ckpt, info["examples"], masked, info["curve"]))
        elif name == "student":
            student = Path(cfg.distillation.checkpoint_dir) / "server" / "best_student_model.pt"
            if not student.is_file():
                log.info("evaluation: no %s (run run_distillation.sh to add the student row)", student)
                continue
            examples = federated_budget(Path(cfg.distillation.checkpoint_dir) / "metrics.jsonl").examples
            specs.append(RowSpec(name, student, examples, _masked_with_heads(student, cfg, DistillationTask())))
        elif name == "random-init":
            ckpt = out / "random_init.pt"
            save_checkpoint(ckpt, build_model(cfg), cfg, round=0)

            def masked(ckpt: Path = ckpt) -> dict[str, Any]:
                model, model_cfg, _ = load_checkpoint(ckpt)
                parts = Path(cfg.data.partitions_dir)
                return masked_prediction(model, model_cfg, [(parts / f"client_{k}", None)
                                                            for k in range(cfg.partition.num_clients)])
            specs.append(RowSpec(name, ckpt, 0, masked))
        else:
            specs.append(RowSpec(name, None, 0, None))
    return specs


def federated_curve(metrics_jsonl: Path) -> list[dict[str, float]]:
    """Validation masked accuracy (and its chance level) after every round, against crops trained on."""
    curve, examples = [], 0
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        examples += sum(int(c.get("num-examples", 0)) for c in record.get("client_train", {}).values())
        val = record.get("val", {})
        if "masked_accuracy" in val:
            curve.append({"examples": examples, "masked_accuracy": val["masked_accuracy"], "loss": val.get("loss"),
                          "chance": val.get("masked_chance")})
    return curve


def encoder_parameters(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    model = load_checkpoint(checkpoint)[0]
    return sum(p.numel() for n, p in model.named_parameters() if not is_head_param(n))


def targets_quality(cfg: Config, out: Path) -> dict[str, Any]:
    """Cluster usage of every client's (and the pooled) training targets; with an alignment file,
    phone purity, cluster purity and PNMI too."""
    phones = read_alignments(Path(cfg.evaluation.alignments)) if cfg.evaluation.alignments else None
    folders = [Path(cfg.data.partitions_dir) / f"client_{k}" for k in range(cfg.partition.num_clients)]
    pooled = out / "centralized" / "partitions" / "client_0"
    result = {}
    for folder in folders + ([pooled] if (pooled / "train.km").is_file() else []):
        name = "pooled (centralized)" if folder == pooled else folder.name
        _, paths, sizes = read_manifest(folder / "train.tsv")
        labels, starts = read_labels(folder / "train.km", sizes, cfg.model.vocab_size - NUM_SPECIAL_SYMBOLS)
        entry: dict[str, Any] = {"unit_perplexity": label_perplexity(labels),
                                 "clusters_used": int(len(np.unique(labels)))}
        if phones is not None:
            units = {Path(p).name.split(".")[0]: labels[starts[i]:starts[i + 1]] for i, p in enumerate(paths)}
            if set(units) & set(phones):
                entry.update(unit_quality(phones, units))
            else:
                log.warning("%s: no utterance of %s is in %s", cfg.evaluation.alignments, folder, name)
        result[name] = entry
    return result


# What an evaluation reads: --overwrite never moves a folder holding one of them aside
EVALUATION_INPUTS = ("data.librispeech_root", "data.partitions_dir", "federation.checkpoint_dir",
                     "distillation.checkpoint_dir", "distillation.teacher_model_path", "evaluation.centralized_init",
                     "kmeans.checkpoint", "federation.init_checkpoint")


def run_evaluation(cfg: Config, rows: list[str] | None = None, federated_round: int | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Measures every row on the same data and writes evaluation.json (with the config), .md and .png.
    Returns the results. ``federated_round``: evaluate that round's global model instead of the best one
    (see row_specs). An output folder evaluated with another config (but the rows, the device and the
    loader workers) is refused, or with ``overwrite`` moved aside (rundir.check_earlier_output): a rerun
    of the same config replaces the table whole; the centralized model and caches are reused while their
    fingerprints hold."""
    from fedhubert.federation.rundir import check_earlier_output
    from fedhubert.report import write_report

    out = Path(cfg.evaluation.output_dir)
    check_earlier_output(cfg, out, out / "evaluation.json", "evaluation.output_dir", EVALUATION_INPUTS, overwrite,
                         ignore=("evaluation.rows", "training.device", "training.loader_workers"))
    rows = list(rows or cfg.evaluation.rows)
    device = resolve_device(cfg.training.device)
    for k in range(cfg.partition.num_clients):  # masked prediction and the targets' quality read them: check them first
        check_client_data(Path(cfg.data.partitions_dir) / f"client_{k}", cfg.model.vocab_size - NUM_SPECIAL_SYMBOLS)
    started = time.perf_counter()
    sets: dict[str, ProbeSet] = {"speaker": speaker_set(cfg), "keyword": keyword_set(cfg, out / "cache" / "espeak")}
    specs = row_specs(cfg, out, rows, federated_round)
    crop_seconds = cfg.data.max_audio_length / cfg.data.sample_rate
    results = []
    for spec in specs:
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            row = probe_row(row_features(spec.checkpoint, cfg, sets, device), sets, cfg.seed)
            row["masked_prediction"] = spec.masked() if spec.masked else None
        row.update(name=spec.name, checkpoint=str(spec.checkpoint) if spec.checkpoint else None,
                   parameters=encoder_parameters(spec.checkpoint), examples=spec.examples,
                   compute_audio_hours=spec.examples * crop_seconds / 3600, curve=spec.curve)
        results.append(row)
        log.info("evaluated %s in %.1f s", spec.name, time.perf_counter() - t0)
    report = {"rows": results, "targets": targets_quality(cfg, out), "seed": cfg.seed, "crop_seconds": crop_seconds,
              "config": cfg.to_dict(),
              "federated_round": federated_round,
              "data": {name: {"clips": len(s), "test_clips": int(sum(s.is_test)), "classes": len(set(s.labels)),
                              "seconds": s.seconds(cfg.data.sample_rate)} for name, s in sets.items()},
              "seconds": time.perf_counter() - started}
    write_report(report, out)
    return report
