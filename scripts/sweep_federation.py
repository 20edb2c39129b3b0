#!/usr/bin/env python
"""Sweep of the federation's server optimizer and of local steps against rounds, judged on the
evaluation probes and the representation-health figures (never on validation loss alone).

Every configuration is the base config plus a few ``--set`` overrides; each runs the project's own
scripts in a subprocess (pretraining, then ``evaluate.py --rows federated``) on one shared partition
and k-means targets, and the reference rows (random-init, mfcc) are evaluated once. Finished runs are
skipped when the sweep is started again, so it can be stopped and resumed (an unfinished run starts
over; its earlier checkpoint folder is moved aside, --overwrite). Writes ``sweep.json`` and
``sweep.md`` (the table) to ``--out``.

    python scripts/sweep_federation.py --config configs/demo.yaml --grid strategies --out sweeps/demo
    python scripts/sweep_federation.py --config configs/demo.yaml --grid drift --out sweeps/demo-drift
    python scripts/sweep_federation.py --config configs/cpu_hour.yaml --grid strategies --only fedadam,fedavg --out sweeps/hour
    python scripts/sweep_federation.py --config configs/demo.yaml --grid privacy --set privacy.clipping_norm=2 --out sweeps/demo-dp

Grids:
  strategies  fedavg (Flower's plain weighted mean); fedavgm with server learning rate 0.1, 0.3, 1.0
              (momentum 0.9: an effective step of 1x to 10x the mean update); fedadam and fedyogi with
              eta in {1e-3, 3e-3, 1e-2, 3e-2} x tau in {1e-9, 1e-3}
  drift       the base strategy at the base config's total local steps per client T = num_rounds x
              max_local_steps, split as rounds x steps = T/80 x 80, T/40 x 40, T/20 x 20, T/10 x 10
              (for the demo's 8 x 20: 2 x 80, 4 x 40, 8 x 20, 16 x 10): client drift against communication
  privacy     client-level DP (client-side clipping at the base config's privacy.clipping_norm) against its noise
              multiplier z: off (z = 0, no clipping), z 0.3, z 1.0, all for the base config's rounds; and z 1.0
              with a budget (privacy.max_epsilon = PRIVACY_BUDGET) that stops it early, its last checkpoint kept
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedhubert.cli import add_config_arguments, run_main  # noqa: E402
from fedhubert.config import load_config  # noqa: E402
from fedhubert.fileio import atomic_write_text  # noqa: E402

ETAS, TAUS = ("1e-3", "3e-3", "1e-2", "3e-2"), ("1e-9", "1e-3")
PRIVACY_BUDGET = "12"  # epsilon at delta 1e-5: z 1.0 over the demo's 3 of 3 clients spends 10.7 by round 4, 12.3 by round 5


def grid(name: str, total_steps: int) -> dict[str, list[str]]:
    """Run name -> its --set overrides (``total_steps``: local steps per client over the base run)."""
    if name == "strategies":
        runs = {"fedavg": ["federation.strategy=fedavg"]}
        runs |= {f"fedavgm-lr{lr}": ["federation.strategy=fedavgm", f"federation.eta={lr}"] for lr in ("0.1", "0.3", "1.0")}
        runs |= {f"{s}-eta{eta}-tau{tau}": [f"federation.strategy={s}", f"federation.eta={eta}", f"federation.tau={tau}"]
                 for s in ("fedadam", "fedyogi") for eta in ETAS for tau in TAUS}
        return runs
    if name == "drift":
        splits = [(total_steps // s, s) for s in (80, 40, 20, 10) if total_steps % s == 0 and total_steps >= s]
        if not splits:
            raise SystemExit("--grid drift needs training.max_local_steps > 0 and federation.num_rounds x "
                             f"training.max_local_steps a multiple of 10, got {total_steps}")
        return {f"rounds{r}-steps{s}": [f"federation.num_rounds={r}", f"training.max_local_steps={s}",
                                        "training.local_epochs=1000"] for r, s in splits}
    if name == "privacy":
        private = ["privacy.enabled=true", "privacy.clipping=client"]
        runs = {"off": ["privacy.enabled=false"]}
        runs |= {f"z{z}": [*private, f"privacy.noise_multiplier={z}", "privacy.max_epsilon=0"] for z in ("0.3", "1.0")}
        runs["z1.0-budget"] = [*private, "privacy.noise_multiplier=1.0", f"privacy.max_epsilon={PRIVACY_BUDGET}"]
        return runs
    raise SystemExit(f"unknown grid {name!r} (strategies, drift, privacy)")


def run(args: list[str], log: Path) -> None:
    """Runs the project's script ``args[0]`` with ``args[1:]`` in the current folder (relative paths in the
    config and the overrides mean what they mean to the sweep itself)."""
    with open(log, "a") as handle:
        done = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed (exit {done.returncode}); see {log}")


def selected(name: str, only: str) -> bool:
    """``only`` is a comma-separated list of names or name prefixes ending at a '-' ("fedavg" is the
    plain FedAvg run, not "fedavgm-lr0.1"; "fedadam-eta1e-2" is both of its tau runs)."""
    return not only or any(name == p or name.startswith(p.rstrip("-") + "-") for p in only.split(",") if p)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def evaluated_round(folder: Path) -> list[str]:
    """evaluate.py's arguments for the run's model: its best, or its last round when no round became the
    best (every round collapsed, e.g. drowned in privacy noise)."""
    if (folder / "ckpt" / "server" / "best_global_model.pt").is_file():
        return []
    history = (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()
    return ["--round", str(json.loads(history[-1])["round"])]


def summarize(name: str, overrides: list[str], folder: Path, seconds: float | None) -> dict:
    """One table row: the probes of the run's best model and its health over all rounds."""
    row = json.loads((folder / "eval" / "evaluation.json").read_text())["rows"][0]
    history = [json.loads(line) for line in (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    final = history[-1]["val"]
    model = evaluated_round(folder)
    return {"name": name, "overrides": overrides, "seconds": seconds, "model": f"round {model[1]}" if model else "best",
            "sid_best": row["speaker_id"]["best_accuracy"], "sid_weighted": row["speaker_id"]["weighted_accuracy"],
            "eer": row["speaker_verification"]["eer"], "keyword_best": row["keyword"]["best_accuracy"],
            "keyword_weighted": row["keyword"]["weighted_accuracy"],
            "min_effective_rank": row["health"]["min_effective_rank"], "max_mean_cosine": row["health"]["max_mean_cosine"],
            "masked_accuracy": (row["masked_prediction"] or {}).get("masked_accuracy"),
            "final_val_loss": final.get("loss"), "best_val_loss": min(r["val"].get("loss", 1e9) for r in history[1:]),
            "collapsed_rounds": [r["round"] for r in history if r.get("collapsed")],
            "rounds": history[-1]["round"], "epsilon": (history[-1].get("privacy") or {}).get("epsilon")}


def table(rows: list[dict], reference: list[dict]) -> str:
    head = ("| run | model | SID best | SID weighted | EER | keyword best | keyword weighted | min eff. rank | max cos | "
            "masked acc | best val loss | final val loss | rounds | epsilon | collapsed rounds |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('model', 'best')} | {pct(r['sid_best'])} | {pct(r['sid_weighted'])} | {pct(r['eer'])} | "
                     f"{pct(r['keyword_best'])} | {pct(r['keyword_weighted'])} | {r['min_effective_rank']:.1f} | "
                     f"{r['max_mean_cosine']:.3f} | {pct(r['masked_accuracy'])} | {r['best_val_loss']:.3f} | "
                     f"{r['final_val_loss']:.3f} | {r.get('rounds', '-')} | "
                     f"{'-' if r.get('epsilon') is None else format(r['epsilon'], '.2f')} | "
                     f"{','.join(map(str, r['collapsed_rounds'])) or '-'} |")
    for r in reference:
        lines.append(f"| ({r['name']}) | - | {pct(r['speaker_id']['best_accuracy'])} | {pct(r['speaker_id']['weighted_accuracy'])} | "
                     f"{pct(r['speaker_verification']['eer'])} | {pct(r['keyword']['best_accuracy'])} | "
                     f"{pct(r['keyword']['weighted_accuracy'])} | {r['health']['min_effective_rank']:.1f} | "
                     f"{r['health']['max_mean_cosine']:.3f} | - | - | - | - | - | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_arguments(parser, "demo.yaml")
    parser.add_argument("--grid", default="strategies", choices=("strategies", "drift", "privacy"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="run only these configurations: comma-separated names or "
                        "'-'-bounded name prefixes, e.g. fedavg,fedadam-eta1e-2 (the table still lists every finished run)")
    args = parser.parse_args()
    from fedhubert.train import check_device  # imports torch: not needed for --help
    cfg = load_config(args.config, args.overrides)  # a bad key, device or precision: one line, before any write
    check_device(cfg)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = ["--config", args.config, *sets([f"data.partitions_dir={out / 'partitions'}", *args.overrides])]
    runs = grid(args.grid, cfg.federation.num_rounds * cfg.training.max_local_steps)
    log = out / "sweep.log"
    if not (out / "partitions" / "client_0" / "train.km").is_file():
        run(["partition_data.py", *base], log)
        run(["generate_kmeans_targets.py", *base], log)
    reference_dir = out / "reference"
    if not (reference_dir / "eval" / "evaluation.json").is_file():  # random-init and mfcc need a federated run's
        first = next(iter(runs.values()))                # folder to exist: a 1-round run
        ref = base + sets([*first, f"federation.checkpoint_dir={reference_dir / 'ckpt'}", "federation.num_rounds=1",
                           f"evaluation.output_dir={reference_dir / 'eval'}"])
        run(["federated_hubert_pretraining.py", *ref, "--overwrite"], log)  # a stopped run's folder: moved aside
        run(["evaluate.py", *ref, "--rows", "random-init,mfcc"], log)
    reference = json.loads((reference_dir / "eval" / "evaluation.json").read_text())["rows"]

    rows = []
    for name, overrides in runs.items():
        folder = out / "runs" / name
        timing = folder / "seconds.txt"
        finished = (folder / "eval" / "evaluation.json").is_file()
        if not finished and not selected(name, args.only):
            continue  # not asked for now (a finished run stays in the table)
        if not finished:
            run_sets = base + sets([*overrides, f"federation.checkpoint_dir={folder / 'ckpt'}",
                                    f"evaluation.output_dir={folder / 'eval'}"])
            started = time.perf_counter()
            print(f"sweep: {name} ...", flush=True)
            run(["federated_hubert_pretraining.py", *run_sets, "--overwrite"], log)  # a stopped run: moved aside
            run(["evaluate.py", *run_sets, "--rows", "federated", *evaluated_round(folder)], log)
            atomic_write_text(timing, f"{time.perf_counter() - started:.1f}\n")
        seconds = float(timing.read_text()) if timing.is_file() else None
        rows.append(summarize(name, overrides, folder, seconds))
        atomic_write_text(out / "sweep.json", json.dumps({"config": args.config, "grid": args.grid, "rows": rows,
                                                          "reference": reference}, indent=2) + "\n")
        atomic_write_text(out / "sweep.md", table(rows, reference))
    print(table(rows, reference))


if __name__ == "__main__":
    run_main(main)
