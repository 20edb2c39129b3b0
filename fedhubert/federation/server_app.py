"""The ServerApp: seeded global model, the FedAdam round loop, checkpoints, resume and metrics, for
every federated task (pretraining, distillation: see tasks.py).

The loop is written out here (rather than calling ``strategy.start``) so that it can resume at round
r + 1, stop cleanly when too few clients succeed or the privacy budget is spent, and checkpoint after
every round.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedhubert.config import Config, load_config
from fedhubert.errors import FederationError, OutputError
from fedhubert.federation.metrics import RunMetrics
from fedhubert.federation.rundir import prepare_checkpoint_dir, round_files
from fedhubert.federation.sampling import PartitionOrder
from fedhubert.federation.strategy import RoundReport, make_strategy
from fedhubert.federation.task import (BEST_ROUND_KEY, TASK_KEY, absolutize_paths, config_record, load_encoder,
                                       split_state)
from fedhubert.federation.tasks import FederatedTask, get_task
from fedhubert.health import collapse_reasons
from fedhubert.train import parse_device

log = logging.getLogger(__name__)


class ServerCheckpoints:
    """``<checkpoint_dir>/server/``: round_<r>.pt (last N kept), the best model (e.g.
    best_global_model.pt) and its Hugging Face export (best_global_model_hf/)."""

    def __init__(self, cfg: Config, task: FederatedTask) -> None:
        self.task, self.cfg = task, cfg
        self.dir = task.checkpoint_dir(cfg) / "server"
        self.keep = cfg.federation.keep_last_checkpoints
        self.best = self.dir / f"{task.best_name}.pt"

    def rounds(self) -> list[tuple[int, Path]]:
        return round_files(self.dir)

    def save_round(self, rnd: int, model: torch.nn.Module, **extras: Any) -> Path:
        """Writes round_<rnd>.pt, then deletes the rounds beyond the last ``keep``. A write that fails
        (e.g. a full disk) leaves every earlier file as it was and stops the run, naming the last good one."""
        path = self.dir / f"round_{rnd}.pt"
        try:
            self.task.save(path, model, self.cfg, round=rnd, **extras)
        except OutputError as exc:
            last = self.rounds()[-1][1] if self.rounds() else "none yet"
            raise FederationError(f"round {rnd}: {exc}; stopping. Last good checkpoint: {last} (fix the cause, "
                                  "e.g. free disk space, and continue from it with --resume)") from None
        for _, old in self.rounds()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def best_round(self) -> int | None:
        """The round the best model's file holds; None when there is none yet."""
        from fedhubert.checkpoint import read_checkpoint

        return int(read_checkpoint(self.best, mmap=True)["round"]) if self.best.exists() else None


def shared_record(model: torch.nn.Module, task: FederatedTask, cfg: Config) -> ArrayRecord:
    """The global model's shared weights as float32 arrays: what FedAdam optimizes."""
    shared, _ = split_state(model, functools.partial(task.is_local, cfg))
    return ArrayRecord({k: Array(v.detach().float().cpu().numpy()) for k, v in shared.items()})


def _round_record(rnd: int, train: dict | None, val: dict | None, train_report: RoundReport | None,
                  eval_report: RoundReport, seconds: float, wire_dtype: str) -> dict[str, Any]:
    reports = [r for r in (train_report, eval_report) if r is not None]
    sent = sum(sum(r.bytes_sent.values()) for r in reports)
    received = sum(sum(r.bytes_received.values()) for r in reports)
    record: dict[str, Any] = {"round": rnd, "train": dict(train or {}), "val": dict(val or {}),
                              "round_time_s": round(seconds, 3), "wire_dtype": wire_dtype,
                              "bytes_sent": sent, "bytes_received": received, "bytes_total": sent + received}
    if train_report is not None:
        record.update(clients_sampled=train_report.sampled, clients_succeeded=len(train_report.succeeded),
                      clients_failed=len(train_report.failed),
                      partitions_succeeded=list(train_report.succeeded),  # e.g. whether a restarted node is back
                      node_of_partition={str(k): v for k, v in train_report.nodes.items()},  # "node N" in failures
                      failures=[f"{who}: {why}" for who, why in train_report.failed],
                      ignored=[f"{who}: {why}" for who, why in train_report.ignored],  # late or unasked-for replies
                      bytes_received_per_client={str(k): v for k, v in train_report.bytes_received.items()},
                      bytes_sent_per_client=next(iter(train_report.bytes_sent.values()), 0),
                      client_train={str(k): v for k, v in train_report.client_metrics.items()})
    if train_report is not None and train_report.privacy:
        record["privacy"] = dict(train_report.privacy)
    record["client_val"] = {str(k): v for k, v in eval_report.client_metrics.items()}
    return record


def sampling_seed(cfg: Config, rnd: int, strategy: Any) -> int | None:
    """The seed of round ``rnd``'s client sample: from the config, so that a resumed run samples the same
    clients; None (OS entropy) under privacy with fewer clients sampled than there are, because the
    accounting's amplification by sampling holds only for a sample nobody can recompute."""
    if strategy.privacy is not None and strategy.privacy.amplified:
        return None
    return cfg.seed * 100_003 + rnd


def run_server(grid: Grid, cfg: Config, resume: bool = False, task: FederatedTask | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Runs the task's rounds (or the rest of them, with ``resume``); pretraining by default. A folder
    holding an earlier run is refused, or moved aside with ``overwrite`` (rundir.py), before any write."""
    task = task or get_task("pretraining")
    cfg = absolutize_paths(cfg)
    labels = task.check_label_space(cfg)  # e.g. codebook_sha1, targets: every checkpoint of the run records them
    strategy = make_strategy(cfg, task.num_rounds(cfg))  # e.g. a privacy.target_epsilon it cannot meet: before any write
    resume_from = prepare_checkpoint_dir(cfg, task, labels, resume=resume, overwrite=overwrite)
    ckpts = ServerCheckpoints(cfg, task)
    metrics = RunMetrics(task.checkpoint_dir(cfg), curves=task.curves)
    best_val, best_round, start = math.inf, -1, 1

    if resume_from is not None:  # its config and labels are the run's (rundir.check_resume)
        last_round, path = resume_from
        saved_model, extras = task.load(path, cfg)
        model = task.client_model(cfg, {})  # the round-0 model is not needed: every weight comes from the file
        model.load_state_dict(saved_model.state_dict())
        start_record = {k: v for k, v in extras.items() if k.startswith("init_")}  # how round 0 was made
        if strategy.privacy is not None and "privacy" not in extras["strategy_state"] and last_round > 0:
            raise FederationError(f"--resume: {path} was trained without privacy.enabled: its rounds have no privacy "
                                  "guarantee to continue; start a new run (another federation.checkpoint_dir)")
        strategy.load_state_dict(extras["strategy_state"])
        metrics = RunMetrics(metrics.out_dir, extras["metrics_history"], curves=task.curves)
        best_val, best_round = float(extras["best_val_loss"]), int(extras.get("best_round", -1))
        start = last_round + 1
        log.info("resuming from %s at round %d", path, start)
    else:
        model, start_record = task.initial_model(cfg, labels)  # e.g. federation.init_checkpoint's encoder
    labels = {**labels, **start_record}
    if resume_from is not None and best_round == resume_from[0] and ckpts.best_round() != best_round:
        # killed between round_<r>.pt and the best model's file: round r was the best, and is the model resumed
        task.save(ckpts.best, model, cfg, round=best_round, val_loss=best_val, **labels)
        log.info("round %d: the best model's file was not written before the run stopped; written now -> %s",
                 best_round, ckpts.best)

    def round_config():  # the whole config, the task, and the best round so far (clients keep its head)
        return config_record(cfg, **{TASK_KEY: task.name, BEST_ROUND_KEY: best_round})

    arrays = shared_record(model, task, cfg)
    f = cfg.federation
    seeded_subset = sampling_seed(cfg, 0, strategy) is not None and min(f.fraction_fit, f.fraction_evaluate) < 1
    sampler = PartitionOrder(grid, f.round_timeout) if seeded_subset else grid  # the same clients in every run
    if not metrics.history:  # round 0: the initial model on every client's validation split, the baseline
        random.seed(cfg.seed)
        replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, round_config(), sampler),
                                        timeout=cfg.federation.round_timeout)
        val = strategy.aggregate_evaluate(0, replies)
        metrics.add(_round_record(0, None, val, None, strategy.evaluate_report, 0.0, cfg.federation.wire_dtype))
        ckpts.save_round(0, model, strategy_state=strategy.state_dict(), metrics_history=metrics.history,
                         best_val_loss=best_val, best_round=best_round, **labels)

    stop_reason = None
    for rnd in range(start, task.num_rounds(cfg) + 1):
        if strategy.privacy is not None and strategy.privacy.next_round_exceeds_budget():
            last = ckpts.rounds()[-1][1] if ckpts.rounds() else "none"
            log.warning("round %d would take epsilon above privacy.max_epsilon %g (spent: %.4g at delta %g): stopping; "
                        "last checkpoint %s", rnd, cfg.privacy.max_epsilon, strategy.privacy.epsilon,
                        cfg.privacy.delta, last)
            stop_reason = "privacy.max_epsilon"
            break
        t0 = time.perf_counter()
        random.seed(sampling_seed(cfg, rnd, strategy))  # Flower samples clients with `random`
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, round_config(), sampler),
                                        timeout=cfg.federation.round_timeout)
        new_arrays, train = strategy.aggregate_train(rnd, replies)
        report = strategy.train_report
        if new_arrays is None:
            last = ckpts.rounds()[-1][1] if ckpts.rounds() else "none yet"
            raise FederationError(
                f"round {rnd}: {len(report.succeeded)} of {report.sampled} clients succeeded, "
                f"federation.min_fit_clients is {cfg.federation.min_fit_clients} "
                f"({'; '.join(f'{w}: {r}' for w, r in report.failed) or 'no replies'}); "
                f"stopping. Last good checkpoint: {last}")
        arrays = new_arrays
        load_encoder(model, {k: torch.from_numpy(a.numpy()) for k, a in arrays.items()},
                     functools.partial(task.is_local, cfg))

        replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, round_config(), sampler),
                                        timeout=cfg.federation.round_timeout)
        val = strategy.aggregate_evaluate(rnd, replies)
        record = _round_record(rnd, train, val, report, strategy.evaluate_report, time.perf_counter() - t0,
                               cfg.federation.wire_dtype)
        collapsed = collapse_reasons(dict(val or {}), metrics.history[0].get("val", {}), cfg)
        record["collapsed"] = collapsed
        metrics.add(record)

        val_loss = float(val["loss"]) if val and "loss" in val else math.inf
        improved = val_loss < best_val and not collapsed  # a collapsed encoder is never the best model
        if improved:
            best_val, best_round = val_loss, rnd
        ckpts.save_round(rnd, model, strategy_state=strategy.state_dict(), metrics_history=metrics.history,
                         best_val_loss=best_val, best_round=best_round, **labels)
        if improved:
            task.save(ckpts.best, model, cfg, round=rnd, val_loss=val_loss, **labels)
            log.info("round %d: new best model (val loss %.4f) -> %s", rnd, val_loss, ckpts.best)
        if collapsed:
            log.warning("round %d: the global encoder looks collapsed: %s; it cannot become the best model%s", rnd,
                        "; ".join(collapsed), " (federation.stop_on_collapse: stopping)" if cfg.federation.stop_on_collapse
                        else "")
            if cfg.federation.stop_on_collapse:
                stop_reason = "federation.stop_on_collapse"
                break

    metrics.close()
    metrics.plot()
    if ckpts.best.exists():
        best_model, _ = task.load(ckpts.best, cfg)
        task.export(best_model, cfg, ckpts.dir / f"{task.best_name}_hf")
    return {"history": metrics.history, "best_val_loss": best_val, "best_round": best_round,
            "checkpoint_dir": str(ckpts.dir), "stop_reason": stop_reason}


# --- `flwr run` entry point ----------------------------------------------------------------------
# pyproject.toml's [tool.flwr.app.config] carries `config` (a YAML path) and `overrides` (space-
# separated section.key=value), `resume`, `overwrite` and `task` (kmeans, pretraining or distillation);
# `flwr run . --run-config '...'` changes them.
app = ServerApp()


def config_from_run_config(run_config: dict) -> Config:
    """The run's Config from ``[tool.flwr.app.config]``'s ``config`` and ``overrides``. The ServerApp runs
    on the SuperLink's machine, in the folder flower-superlink was started in: ``~`` in ``config`` is that
    machine's home and a relative path is relative to that folder (path keys alike: absolutize_paths)."""
    overrides = str(run_config.get("overrides", "")).split()
    return load_config(Path(str(run_config.get("config", "configs/pretraining_config.yaml"))).expanduser(), overrides)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    task = str(run_config.get("task", "pretraining"))
    if task == "kmeans":  # kmeans.codebook=federated: the shared codebook, before the pretraining
        from fedhubert.federation.kmeans_app import run_kmeans_server  # torchaudio, scikit-learn: only here

        run_kmeans_server(grid, config_from_run_config(run_config))
        return
    cfg = config_from_run_config(run_config)
    parse_device(cfg.training.device)  # e.g. 'tpu': refused here; whether a node has CUDA, only it knows
    run_server(grid, cfg, resume=bool(run_config.get("resume", False)), task=get_task(task),
               overwrite=bool(run_config.get("overwrite", False)))
