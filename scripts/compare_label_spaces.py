#!/usr/bin/env python
"""One label space or many, and HuBERT's second iteration, judged on the evaluation probes: local
codebooks (a k-means per client) against one federated codebook (federated k-means, federated head),
iteration 1 (MFCC targets) against iteration 2 (k-means on iteration 1's own features, training
continued from its encoder), each next to the centralized run at equal compute.

    python scripts/compare_label_spaces.py --out comparisons/demo
    python scripts/compare_label_spaces.py --config configs/cpu_hour.yaml --out comparisons/hour --only local-it1

Cells (each one chain of the project's own scripts, run in a subprocess; a finished cell is skipped
when the comparison is started again, an unfinished one starts over with its earlier checkpoint folder
moved aside, --overwrite):
  <codebook>-it1    partition_data.py, generate_kmeans_targets.py (MFCC, kmeans.codebook=<codebook>),
                    federated_hubert_pretraining.py, evaluate.py --rows federated,centralized
  <codebook>-it2    the same with --iteration2-config (K-means on layer kmeans.layer of <codebook>-it1's
                    best model, federation.init_checkpoint = that model); its centralized row repeats
                    the recipe on the pooled data from <codebook>-it1's centralized model
                    (evaluation.centralized_init), so both rows have the compute of two iterations
  local-it1-2x      iteration 1 with twice the rounds: the compute of two iterations in one, so that
                    iteration 2 is judged against training longer, not only against iteration 1
The reference rows (random-init, mfcc) come from local-it1's evaluation. Writes comparison.json and
comparison.md (the table) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from fedhubert.cli import add_config_arguments, run_main  # noqa: E402
from fedhubert.config import REPO_ROOT, load_config  # noqa: E402
from fedhubert.fileio import atomic_write_text  # noqa: E402
from sweep_federation import run, selected, sets  # noqa: E402

CODEBOOKS = ("local", "federated")
BEST = "server/best_global_model.pt"


def cells(out: Path, rounds: int) -> dict[str, dict]:
    """Cell name -> {"iteration", "codebook", "after" (the cell it continues, or None), "overrides"}:
    every folder a cell writes is under ``out/<name>``; ``rounds`` is the base config's num_rounds."""
    plan: dict[str, dict] = {}
    for codebook in CODEBOOKS:
        for iteration in (1, 2):
            name, after = f"{codebook}-it{iteration}", f"{codebook}-it1" if iteration == 2 else None
            overrides = [f"kmeans.codebook={codebook}"]
            if after:
                overrides += [f"kmeans.checkpoint={out / after / 'ckpt' / BEST}",
                              f"federation.init_checkpoint={out / after / 'ckpt' / BEST}",
                              f"evaluation.centralized_init={out / after / 'eval' / 'centralized' / 'model.pt'}"]
            plan[name] = {"iteration": iteration, "codebook": codebook, "after": after, "overrides": overrides}
    plan["local-it1-2x"] = {"iteration": 1, "codebook": "local", "after": None,
                            "overrides": ["kmeans.codebook=local", f"federation.num_rounds={2 * rounds}"]}
    return plan


def folders(out: Path, name: str) -> list[str]:
    """The --set overrides that keep a cell's partitions, checkpoints and evaluation in ``out/<name>``."""
    cell = out / name
    return [f"data.partitions_dir={cell / 'partitions'}", f"federation.checkpoint_dir={cell / 'ckpt'}",
            f"evaluation.output_dir={cell / 'eval'}"]


def run_cell(name: str, cell: dict, config: str, out: Path, extra: list[str], log: Path) -> None:
    rows = "federated,centralized" + (",random-init,mfcc" if name == "local-it1" else "")
    # the cell's own keys win over the --set given to every cell (e.g. num_rounds in local-it1-2x)
    args = ["--config", config, *sets([*folders(out, name), *extra, *cell["overrides"]])]
    for script in ("partition_data.py", "generate_kmeans_targets.py"):
        run([script, *args], log)
    run(["federated_hubert_pretraining.py", *args, "--overwrite"], log)  # a stopped cell's run: moved aside
    run(["evaluate.py", *args, "--rows", rows], log)


def summarize(name: str, cell: dict, evaluation: dict, before: dict | None) -> list[dict]:
    """The cell's federated and centralized rows. Compute counts every iteration a model went through
    (``before``: the evaluation of the cell it continues); clusters used is the clients' mean (the
    federated row) or the pooled k-means' (the centralized row)."""
    targets = evaluation["targets"]
    clients = [v for k, v in targets.items() if k.startswith("client_")]
    pooled = targets.get("pooled (centralized)", {})
    earlier = {r["name"]: r["compute_audio_hours"] for r in before["rows"]} if before else {}
    rows = []
    for row in evaluation["rows"]:
        if row["name"] not in ("federated", "centralized"):
            continue
        masked = row.get("masked_prediction") or {}
        units = clients if row["name"] == "federated" else [pooled] if pooled else []
        mean = lambda key: sum(u[key] for u in units) / len(units) if units else None  # noqa: E731
        rows.append({"cell": name, "row": row["name"], "codebook": cell["codebook"] if row["name"] == "federated" else "pooled",
                     "iteration": cell["iteration"], "compute_hours": row["compute_audio_hours"] + earlier.get(row["name"], 0.0),
                     "sid_best": row["speaker_id"]["best_accuracy"], "sid_weighted": row["speaker_id"]["weighted_accuracy"],
                     "eer": row["speaker_verification"]["eer"], "keyword_best": row["keyword"]["best_accuracy"],
                     "keyword_weighted": row["keyword"]["weighted_accuracy"],
                     "masked_accuracy": masked.get("masked_accuracy"), "masked_chance": masked.get("chance"),
                     "clusters_used": mean("clusters_used"), "unit_perplexity": mean("unit_perplexity"),
                     "pnmi": mean("pnmi") if units and all("pnmi" in u for u in units) else None})
    return rows


def table(rows: list[dict], reference: list[dict]) -> str:
    head = ("| cell | row | codebook | iteration | compute (audio h) | SID best / weighted | EER | keyword best / weighted | "
            "masked acc (chance) | clusters used | unit perplexity | PNMI |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    num = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['cell']} | {r['row']} | {r['codebook']} | {r['iteration']} | {r['compute_hours']:.2f} | "
                     f"{pct(r['sid_best'])} / {pct(r['sid_weighted'])} | {pct(r['eer'])} | "
                     f"{pct(r['keyword_best'])} / {pct(r['keyword_weighted'])} | "
                     f"{pct(r['masked_accuracy'])} ({pct(r['masked_chance'])}) | {num(r['clusters_used'])} | "
                     f"{num(r['unit_perplexity'])} | {'-' if r['pnmi'] is None else format(r['pnmi'], '.3f')} |")
    for r in reference:
        lines.append(f"| ({r['name']}) | | | | 0 | {pct(r['speaker_id']['best_accuracy'])} / "
                     f"{pct(r['speaker_id']['weighted_accuracy'])} | {pct(r['speaker_verification']['eer'])} | "
                     f"{pct(r['keyword']['best_accuracy'])} / {pct(r['keyword']['weighted_accuracy'])} | - | - | - | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_arguments(parser, "demo.yaml")  # iteration 1's config; --set applies to every cell
    parser.add_argument("--iteration2-config", default=str(REPO_ROOT / "configs" / "iteration2.yaml"),
                        help="iteration 2's config (its folders and checkpoints are replaced by the cell's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="run only these cells (comma-separated names or '-'-bounded "
                        "prefixes, e.g. local or federated-it1); a cell also runs the cell it continues")
    args = parser.parse_args()
    from fedhubert.train import check_device  # imports torch: not needed for --help
    base = load_config(args.config, args.overrides)  # a bad key, device or precision: one line, before any write
    check_device(base)
    check_device(load_config(args.iteration2_config, args.overrides))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = cells(out, base.federation.num_rounds)
    log = out / "comparison.log"

    def done(name: str) -> bool:
        return (out / name / "eval" / "evaluation.json").is_file()

    wanted = [n for n in plan if selected(n, args.only)]
    wanted = [*{n: None for w in wanted for n in ([plan[w]["after"]] if plan[w]["after"] else []) + [w]}]
    for name in wanted:
        if done(name):
            continue
        config = args.iteration2_config if plan[name]["iteration"] == 2 else args.config
        print(f"comparison: {name} ...", flush=True)
        started = time.perf_counter()
        run_cell(name, plan[name], config, out, args.overrides, log)
        atomic_write_text(out / name / "seconds.txt", f"{time.perf_counter() - started:.1f}\n")

    rows, reference = [], []
    for name, cell in plan.items():
        if not done(name):
            continue
        evaluation = json.loads((out / name / "eval" / "evaluation.json").read_text())
        before = json.loads((out / cell["after"] / "eval" / "evaluation.json").read_text()) if cell["after"] else None
        rows += summarize(name, cell, evaluation, before)
        reference += [r for r in evaluation["rows"] if r["name"] in ("random-init", "mfcc")]
    atomic_write_text(out / "comparison.json", json.dumps({"config": args.config, "iteration2_config": args.iteration2_config,
                                                           "rows": rows, "reference": reference}, indent=2) + "\n")
    atomic_write_text(out / "comparison.md", table(rows, reference))
    print(table(rows, reference))


if __name__ == "__main__":
    run_main(main)
