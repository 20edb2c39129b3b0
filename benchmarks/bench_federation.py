"""Flower's cost: the federated simulation against the same work in a plain loop, and bytes on the wire.

1. Overhead. K clients × S local steps × R rounds (plus each round's validation) run twice in this
   script: through the project's Flower simulation (Ray backend, one CPU per client), and as a plain
   Python loop doing the same client work (the same model, loaders, train_local and evaluate_local)
   in a process pool of the same size (cores / client_num_cpus workers, client_num_cpus torch threads
   each) with the same FedAdam update done in numpy. Reported: whole-run wall time and steady-state
   time per round (rounds >= 2, no start-up), simulation / plain. Goal: per-round ratio <= 1.10.
2. Bytes per round per client (server → client and back) against the float32 size of the encoder,
   for each wire dtype. Goal: exactly 1.0 for float32, 0.5 for float16 and bfloat16.

Usage: python benchmarks/bench_federation.py [--rounds 3] [--steps 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedhubert.config import Config, config_from_dict, load_config  # noqa: E402
from fedhubert.data import derive_seed, make_loader  # noqa: E402
from fedhubert.federation.simulation import run_federated_pretraining  # noqa: E402
from fedhubert.federation.task import build_model, split_state  # noqa: E402
from fedhubert.partition import partition_corpus  # noqa: E402
from fedhubert.targets import generate_targets  # noqa: E402
from fedhubert.train import evaluate_local, train_local  # noqa: E402


def client_work(cfg_dict: dict, encoder: dict, head: dict | None, rnd: int, k: int) -> tuple[dict, dict, int]:
    """One client's round, as the ClientApp does it, without Flower: train, then validate."""
    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.federation.client_num_cpus)))
    model = build_model(cfg)
    model.load_state_dict({**encoder, **(head or {})}, strict=False)
    client_dir = Path(cfg.data.partitions_dir) / f"client_{k}"
    seed = derive_seed(cfg.seed, rnd, k)
    metrics = train_local(model, make_loader(client_dir, "train", cfg, batch_size=int(cfg.training.batch_size),
                                             seed=seed, train=True), cfg, "cpu", seed=seed)
    evaluate_local(model, make_loader(client_dir, "valid", cfg, batch_size=int(cfg.training.batch_size),
                                      seed=cfg.seed, train=False), cfg, "cpu")
    new_encoder, new_head = split_state(model)
    return ({n: t.numpy() for n, t in new_encoder.items()}, {n: t.clone() for n, t in new_head.items()},
            int(metrics["num_examples"]))


def plain_loop(cfg: Config) -> list[float]:
    """The federated computation in a plain loop; returns the wall time of each round."""
    f = cfg.federation
    encoder, _ = split_state(build_model(cfg))
    x = {n: t.numpy().copy() for n, t in encoder.items()}
    m = {n: np.zeros_like(v) for n, v in x.items()}
    v = {n: np.zeros_like(a) for n, a in x.items()}
    heads: dict[int, dict] = {}
    workers = max(1, int((os.cpu_count() or 1) // max(f.client_num_cpus, 1)))
    times = []
    with ProcessPoolExecutor(workers) as pool:
        for rnd in range(1, f.num_rounds + 1):
            start = time.perf_counter()
            jobs = [pool.submit(client_work, cfg.to_dict(), {n: torch.from_numpy(a) for n, a in x.items()},
                                heads.get(k), rnd, k) for k in range(cfg.partition.num_clients)]
            results = [job.result() for job in jobs]
            total = sum(n for _, _, n in results)
            for k, (_, head, _) in enumerate(results):
                heads[k] = head
            for name in x:  # FedAdam, as Flower's strategy computes it
                delta = sum(enc[name] * (n / total) for enc, _, n in results) - x[name]
                m[name] = f.beta_1 * m[name] + (1 - f.beta_1) * delta
                v[name] = f.beta_2 * v[name] + (1 - f.beta_2) * delta**2
                eta = f.eta * np.sqrt(1 - f.beta_2 ** (rnd + 1)) / (1 - f.beta_1 ** (rnd + 1))
                x[name] = (x[name] + eta * m[name] / (np.sqrt(v[name]) + f.tau)).astype(np.float32)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="local steps per client per round")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "federation.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_federation_"))
    base = [f"data.partitions_dir={work / 'partitions'}", f"federation.num_rounds={args.rounds}",
            f"training.max_local_steps={args.steps}"]
    cfg = load_config(args.config, base)
    partition_corpus(cfg)
    generate_targets(cfg)

    # 1. Overhead: simulation vs plain loop, same work.
    sim_cfg = load_config(args.config, base + [f"federation.checkpoint_dir={work / 'sim'}"])
    start = time.perf_counter()
    history = run_federated_pretraining(sim_cfg)["history"]
    sim_total = time.perf_counter() - start
    sim_rounds = [r["round_time_s"] for r in history if r["round"] >= 1]
    start = time.perf_counter()
    plain_rounds = plain_loop(cfg)
    plain_total = time.perf_counter() - start
    steady = slice(1, None) if args.rounds > 1 else slice(None)
    overhead = {"clients": cfg.partition.num_clients, "local_steps": args.steps, "rounds": args.rounds,
                "simulation_total_s": round(sim_total, 2), "plain_total_s": round(plain_total, 2),
                "total_ratio": round(sim_total / plain_total, 3),
                "simulation_round_s": sim_rounds, "plain_round_s": [round(t, 3) for t in plain_rounds],
                "steady_round_ratio": round(float(np.mean(sim_rounds[steady]) / np.mean(plain_rounds[steady])), 3)}

    # 2. Bytes per round per client for each wire dtype, against the float32 encoder size.
    encoder, _ = split_state(build_model(cfg))
    fp32_bytes = sum(t.numel() * 4 for t in encoder.values())
    wire = {}
    for dtype in ("float32", "float16", "bfloat16"):
        wcfg = load_config(args.config, base + ["federation.num_rounds=1", "training.max_local_steps=1",
                                                f"federation.wire_dtype={dtype}",
                                                f"federation.checkpoint_dir={work / dtype}"])
        record = run_federated_pretraining(wcfg)["history"][1]
        received = list(record["bytes_received_per_client"].values())
        wire[dtype] = {"sent_ratio": record["bytes_sent_per_client"] / fp32_bytes,
                       "received_ratio": max(received) / fp32_bytes, "fp32_encoder_bytes": fp32_bytes,
                       "val_loss": record["val"]["loss"]}

    result = {"overhead": overhead, "wire": wire}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"federation | sim/plain per round {overhead['steady_round_ratio']:.3f}x (goal <= 1.10), "
          f"whole run {overhead['total_ratio']:.3f}x | bytes/fp32: "
          + ", ".join(f"{k} {w['sent_ratio']:.3f}/{w['received_ratio']:.3f}" for k, w in wire.items()))


if __name__ == "__main__":
    main()
