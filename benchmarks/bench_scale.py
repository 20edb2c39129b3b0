"""Memory and time of the whole chain against the number of clients: one client per speaker of a
LibriSpeech-960-shaped corpus (scripts/make_scale_corpus.py), for N = 4, 64, 512 and 2,338 clients.

For each N this runs, as the README's commands do (configs/scale.yaml: a tiny HuBERT, per-client
k-means, ``--per-round`` clients sampled per round):
  make_scale_corpus.py --speakers N --utterances U     (skipped when the tree exists)
  partition_data.py, generate_kmeans_targets.py, federated_hubert_pretraining.py
and samples every 0.2 s (psutil) the RSS of each stage's process (the simulation's ServerApp and engine,
which hold every virtual node's context.state) and the summed RSS of its whole process tree (Ray's
GCS, raylet and workers, the client actors). The claim checked: the simulation's peak memory does not
grow with N beyond a small per-node constant. Clients that trained keep their head on disk
(client_<k>/head_round_<r>.pt), never in the node state; ``clients_with_state`` counts them.

Writes benchmarks/results/scale.json (rows merged by tag and N) and prints the table.
Usage: python benchmarks/bench_scale.py --work DIR [--clients 4,64,512,2338] [--utterances 4]
       [--rounds 3] [--per-round 4] [--tag short] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of ``proc``, summed RSS of ``proc`` and all its descendants), in bytes."""
    own = proc.memory_info().rss
    total = own
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # ended between the listing and the read
            pass
    return own, total


def run_sampled(cmd: list[str], log: Path, interval: float = 0.2) -> dict:
    """Runs ``cmd`` (output to ``log``), sampling its memory every ``interval`` s; peaks in GB, wall s."""
    start = time.perf_counter()
    with open(log, "w") as out:
        popen = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        proc, own_peak, tree_peak = psutil.Process(popen.pid), 0, 0
        while popen.poll() is None:
            try:
                own, tree = tree_rss(proc)
            except psutil.Error:
                break
            own_peak, tree_peak = max(own_peak, own), max(tree_peak, tree)
            time.sleep(interval)
        popen.wait()
    if popen.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {popen.returncode}; {log}):\n" + "\n".join(tail))
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_gb": round(own_peak / GB, 3),
            "peak_tree_rss_gb": round(tree_peak / GB, 3)}


def one_size(work: Path, n: int, args: argparse.Namespace) -> dict:
    """The chain for ``n`` clients; one result row."""
    folder = work / f"n{n}"
    root, parts, ckpt = folder / "LibriSpeech", folder / "partitions", folder / f"checkpoints-{args.tag}"
    folder.mkdir(parents=True, exist_ok=True)
    if not root.exists():
        subprocess.run([sys.executable, "scripts/make_scale_corpus.py", "--out", str(root), "--speakers", str(n),
                        "--utterances", str(args.utterances)], cwd=REPO, check=True)
    sets = [f"data.librispeech_root={root}", f"data.partitions_dir={parts}", f"partition.num_clients={n}",
            f"federation.checkpoint_dir={ckpt}", f"federation.num_rounds={args.rounds}",
            *(f"federation.{key}={args.per_round}" for key in ("min_fit_clients", "min_evaluate_clients",
                                                                 "min_available_clients")), *args.set]
    common = ["--config", "configs/scale.yaml", *(a for s in sets for a in ("--set", s))]
    row: dict = {"tag": args.tag, "clients": n, "utterances_per_client": args.utterances, "rounds": args.rounds,
                 "clients_per_round": args.per_round}
    if not (parts / "targets.json").is_file():
        row["partition"] = run_sampled([sys.executable, "partition_data.py", *common], folder / "partition.log")
        row["targets"] = run_sampled([sys.executable, "generate_kmeans_targets.py", *common], folder / "targets.log")
        row["targets"]["s_per_client"] = round(row["targets"]["wall_s"] / n, 3)
    row["simulation"] = run_sampled([sys.executable, "federated_hubert_pretraining.py", *common, "--overwrite"],
                                    folder / f"simulation-{args.tag}.log")
    row["clients_with_state"] = sum(1 for d in (ckpt / "clients").glob("client_*") if any(d.glob("head_round_*.pt")))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the corpora, partitions and runs (kept)")
    parser.add_argument("--clients", default="4,64,512,2338", help="client counts, comma-separated")
    parser.add_argument("--utterances", type=int, default=4, help="utterances per speaker (= client)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=4, help="clients sampled per round (training and validation)")
    parser.add_argument("--tag", default="short", help="name of this series in the results (e.g. long)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every stage, e.g. model.hidden_size=768 (give a --tag)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    work = Path(args.work).expanduser().resolve()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    for n in (int(c) for c in args.clients.split(",")):
        row = one_size(work, n, args)
        rows = [r for r in rows if (r["tag"], r["clients"]) != (args.tag, n)] + [row]
        rows.sort(key=lambda r: (r["tag"], r["clients"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        sim = row["simulation"]
        print(f"{args.tag} N={n}: simulation peak tree {sim['peak_tree_rss_gb']} GB, main process "
              f"{sim['peak_rss_gb']} GB, {sim['wall_s']} s; {row['clients_with_state']} clients trained", flush=True)
    print("| tag | clients | rounds x sampled | clients trained | simulation: tree peak GB | main process peak GB "
          "| wall s | targets s/client |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("targets", {})
        print(f"| {r['tag']} | {r['clients']} | {r['rounds']} x {r['clients_per_round']} | {r['clients_with_state']} "
              f"| {r['simulation']['peak_tree_rss_gb']} | {r['simulation']['peak_rss_gb']} | "
              f"{r['simulation']['wall_s']} | {t.get('s_per_client', '')} |")


if __name__ == "__main__":
    main()
