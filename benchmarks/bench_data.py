"""Data-stage speed on the bundled corpus (or --root): manifest building and label generation.

Reports, as JSON (stdout and benchmarks/results/data.json) plus one table line:
  manifest   files/s of the header-only scan (data.scan_workers threads), and the ratio against a
             reference scan that decodes every file (what a header-less scan would cost);
  mfcc       audio seconds per wall second per core (one torch thread), and the ratio against torch's
             default thread count on the same audio;
  kmeans     audio seconds per wall second per core for fitting (partial_fit, fit_passes passes) and
             for labelling (predict), with BLAS/OpenMP limited to one thread;
  decode     audio seconds per wall second of soundfile decoding + resampling (load_audio);
  label      decode + MFCC + predict together, per core: the labelling pass of one utterance;
  floors     what bounds that figure: torchaudio's power spectrogram alone (MFCC's first step), and the
             reference FLAC decoder (`flac -d`, libFLAC's own tool, when it is installed) decoding the same
             files, both per CPU second;
  cache      the feature cache (features.FeatureCache) against recomputing: seconds per audio hour to
             decode + MFCC again, and to write the frames once and read them back; a client's k-means
             uses every training utterance fit_passes + 1 times, so the cache saves fit_passes recomputes;
  workers    generate_kmeans_targets.py (kmeans.codebook=local) with kmeans.workers=2 against 1: wall
             time ratio on the same clients (process start-up included), and its audio-s/s per core; next
             to it, 2 processes against 1 on a pure-Python loop (what a shared machine gives a second
             process at that moment).
With --scale-corpus DIR (a tree from scripts/make_scale_corpus.py: 2,338 speakers, 280,560 files) also,
on that tree: the header scan's files/s, partition_data.py with one client per speaker (wall time,
peak RSS of its process) and the workers ratio on --scale-clients of its clients (their own audio).
Usage: python benchmarks/bench_data.py [--root DIR] [--max-files N] [--scale-corpus DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import soundfile as sf
import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedhubert.audio import load_audio  # noqa: E402
from fedhubert.config import load_config, num_frames  # noqa: E402
from fedhubert.librispeech import scan_corpus  # noqa: E402
from fedhubert.features import FeatureCache, MfccFeatures, single_torch_thread  # noqa: E402
from fedhubert.partition import partition_corpus  # noqa: E402
from fedhubert.targets import cluster_count, fit_kmeans, generate_targets  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_scale import run_sampled  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_timed(fn):
    """(result, wall s, CPU s of this process: all its threads): on a shared machine the CPU time, not
    the wall time, says what the work costs."""
    cpu = time.process_time()
    result, wall = timed(fn)
    return result, wall, time.process_time() - cpu


def flac_cli_audio_s_per_cpu_s(paths: list[Path], audio_s: float) -> float | None:
    """Audio seconds per CPU second of libFLAC's own command-line decoder on ``paths`` (one process,
    output discarded): what decoding costs without libsndfile. None when ``flac`` is not installed."""
    if shutil.which("flac") is None:
        return None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["flac", "--silent", "--decode", "--stdout", *map(str, paths)], check=True,
                   stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(audio_s / (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime), 1)


def _busy(n: int) -> int:
    return sum(range(n))


def parallel_control() -> float:
    """Speed-up of 2 processes over 1 on a pure-Python loop, measured now: what the machine gives a second
    process at this moment (1.0 when other jobs hold the other core), to read the workers ratio against."""
    _, serial = timed(lambda: [_busy(10_000_000) for _ in range(2)])
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_busy, [1, 1]))  # start both processes before timing
        _, parallel = timed(lambda: list(pool.map(_busy, [10_000_000] * 2)))
    return round(serial / parallel, 2)


def workers_ratio(root: Path, work: Path, cfg_path: str, subsets: list[str], num_clients: int,
                  clients: int | None) -> dict:
    """generate_targets on ``clients`` (default all) of a speaker-based partition of ``root``, with
    kmeans.workers 1 then 2: wall times, their ratio, and audio-s per wall-s per core."""
    sets = [f"data.librispeech_root={root}", f"data.partitions_dir={work}", f"partition.num_clients={num_clients}",
            f"data.subsets=[{','.join(subsets)}]", "kmeans.codebook=local", "partition.heldout_per_speaker=0"]
    cfg = load_config(cfg_path, sets)
    if not (work / "summary.json").is_file():
        partition_corpus(cfg)
    ids = ",".join(map(str, range(clients))) if clients else None
    times = {}
    for w in (1, 2):
        _, times[w] = timed(lambda: generate_targets(load_config(cfg_path, [*sets, f"kmeans.workers={w}"]), ids))
    picked = range(clients or num_clients)
    audio = sum(int(line.split("\t")[1]) for k in picked for split in ("train", "valid")
                for line in (work / f"client_{k}" / f"{split}.tsv").read_text().splitlines()[1:]) / cfg.data.sample_rate
    return {"clients": len(picked), "audio_s": round(audio, 1), "workers_1_s": round(times[1], 1),
            "workers_2_s": round(times[2], 1), "speedup_2_vs_1": round(times[1] / times[2], 2),
            "targets_audio_s_per_s_per_core": round(audio / times[1], 1), "load_average": os.getloadavg()[0],
            "control_2_processes_speedup": parallel_control()}


def scale_figures(tree: Path, cfg_path: str, work: Path, clients: int) -> dict:
    """The manifest, partition and targets figures on a make_scale_corpus.py tree."""
    cfg = load_config(cfg_path, [f"data.librispeech_root={tree}"])
    (rows, _), t_scan, cpu_scan = cpu_timed(lambda: scan_corpus(tree, [], cfg.data.sample_rate,
                                                                cfg.data.min_audio_length, cfg.data.scan_workers))
    speakers, subsets = len({r.speaker for r in rows}), sorted({r.subset for r in rows})
    sets = [f"data.librispeech_root={tree}", f"data.partitions_dir={work / 'all'}", f"partition.num_clients={speakers}",
            f"data.subsets=[{','.join(subsets)}]", "kmeans.codebook=local", "partition.heldout_per_speaker=0"]
    work.mkdir(parents=True, exist_ok=True)
    part = run_sampled([sys.executable, "partition_data.py", "--config", cfg_path,
                        *(a for s in sets for a in ("--set", s))], work / "partition.log")
    return {"corpus": str(tree), "files": len(rows), "speakers": speakers, "load_average_before": os.getloadavg()[0],
            "manifest_files_per_s": round(len(rows) / t_scan, 1),
            "manifest_files_per_cpu_s": round(len(rows) / cpu_scan, 1),
            "partition": {**part, "clients": speakers, "files_per_s": round(len(rows) / part["wall_s"], 1)},
            "workers": workers_ratio(tree, work / "all", cfg_path, subsets, speakers, clients)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / "corpus" / "LibriSpeech"), help="LibriSpeech root")
    parser.add_argument("--config", default=str(REPO / "configs" / "pretraining_config.yaml"))
    parser.add_argument("--max-files", type=int, default=400, help="utterances used for label timing")
    parser.add_argument("--scale-corpus", default=None, help="also measure on this make_scale_corpus.py tree")
    parser.add_argument("--scale-clients", type=int, default=8, help="clients of the scale tree in the workers ratio")
    parser.add_argument("--work", default=None, help="folder for partitions and labels (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.librispeech_root={args.root}"])
    sr = cfg.data.sample_rate

    # Manifest: header-only scan (warm file cache: one untimed pass first) vs a full-decode reference.
    every = sorted(d.name for d in Path(args.root).iterdir() if d.is_dir())  # a speed test: dev/test sets too
    scan = lambda: scan_corpus(args.root, every, sr, cfg.data.min_audio_length, cfg.data.scan_workers)  # noqa: E731
    scan()
    (rows, _), t_scan, cpu_scan = cpu_timed(scan)
    _, t_decode_ref = timed(lambda: [sf.read(Path(args.root) / r.path, dtype="float32") for r in rows])

    # Label generation on (up to) max_files utterances, spread over the corpus.
    picked = rows[:: max(1, len(rows) // args.max_files)][: args.max_files]
    audio_s = sum(r.num_samples for r in picked) / sr
    with single_torch_thread():
        wavs, t_load, c_load = cpu_timed(lambda: [load_audio(Path(args.root) / r.path, sr) for r in picked])
        features = MfccFeatures(cfg)
        features(wavs[0])  # warm-up
        feats, t_mfcc, c_mfcc = cpu_timed(lambda: [features(w) for w in wavs])
        spectrogram = features.mfcc.MelSpectrogram.spectrogram  # MFCC's first step: |STFT|^2
        _, _, c_spec = cpu_timed(lambda: [spectrogram(w) for w in wavs])
    default_threads = torch.get_num_threads()
    _, t_mfcc_default = timed(lambda: [features(w) for w in wavs])
    frames = sum(len(f) for f in feats)
    assert frames == sum(num_frames(r.num_samples) for r in picked)

    with tempfile.TemporaryDirectory() as tmp, FeatureCache(Path(tmp), features.dim) as cache:
        _, t_cache_write = timed(lambda: [cache.append(f) for f in feats])
        _, t_cache_read = timed(lambda: [cache[i] for i in range(len(cache))])

    k = cluster_count(frames, cfg, "benchmark")
    chunk = max(cfg.kmeans.batch_size, k)
    with threadpool_limits(1):
        km, t_fit = timed(lambda: fit_kmeans(lambda p: iter(feats), features.dim, k, chunk,
                                             cfg.kmeans.fit_passes, cfg.seed))
        _, t_predict, c_predict = cpu_timed(lambda: [km.predict(f) for f in feats])

    result = {
        "corpus": str(Path(args.root).resolve()), "files": len(rows), "label_utterances": len(picked),
        "label_audio_seconds": round(audio_s, 1), "frames": frames, "n_clusters": k, "chunk": chunk,
        "fit_passes": cfg.kmeans.fit_passes, "scan_workers": cfg.data.scan_workers,
        "manifest_files_per_s": round(len(rows) / t_scan, 1),
        "manifest_files_per_cpu_s": round(len(rows) / cpu_scan, 1),
        "manifest_speedup_vs_full_decode": round(t_decode_ref / t_scan, 2),
        "decode_audio_s_per_s": round(audio_s / t_load, 1),
        "mfcc_audio_s_per_s_per_core": round(audio_s / t_mfcc, 1),
        "mfcc_speedup_vs_default_threads": round(t_mfcc_default / t_mfcc, 2),
        "torch_default_threads": default_threads,
        "kmeans_fit_audio_s_per_s_per_core": round(audio_s / t_fit, 1),
        "kmeans_label_audio_s_per_s_per_core": round(audio_s / t_predict, 1),
        "decode_mfcc_label_audio_s_per_s_per_core": round(audio_s / (t_load + t_mfcc + t_predict), 1),
        # one thread: audio seconds per CPU second is the per-core speed however busy the machine is
        "decode_mfcc_label_audio_s_per_cpu_s": round(audio_s / (c_load + c_mfcc + c_predict), 1),
        "decode_audio_s_per_cpu_s": round(audio_s / c_load, 1),
        "mfcc_audio_s_per_cpu_s": round(audio_s / c_mfcc, 1),
        "label_audio_s_per_cpu_s": round(audio_s / c_predict, 1),
        "floors": {"spectrogram_audio_s_per_cpu_s": round(audio_s / c_spec, 1),
                   "flac_cli_decode_audio_s_per_cpu_s": flac_cli_audio_s_per_cpu_s(
                       [Path(args.root) / r.path for r in picked], audio_s)},
        "feature_cache": {
            "recompute_s_per_audio_h": round((t_load + t_mfcc) / audio_s * 3600, 3),
            "write_s_per_audio_h": round(t_cache_write / audio_s * 3600, 3),
            "read_s_per_audio_h": round(t_cache_read / audio_s * 3600, 3),
            # per audio hour of a client's training split, fit_passes + 1 uses of each utterance
            "client_s_per_audio_h_without": round(((cfg.kmeans.fit_passes + 1) * (t_load + t_mfcc) + t_fit + t_predict)
                                                  / audio_s * 3600, 2),
            "client_s_per_audio_h_with": round((t_load + t_mfcc + t_cache_write + (cfg.kmeans.fit_passes + 1)
                                                * t_cache_read + t_fit + t_predict) / audio_s * 3600, 2),
        },
        "load_average": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        speakers, subsets = len({r.speaker for r in rows}), sorted({r.subset for r in rows})
        result["workers"] = workers_ratio(Path(args.root), work / "bundled", args.config, subsets, speakers, None)
        if args.scale_corpus:
            result["scale"] = scale_figures(Path(args.scale_corpus).resolve(), args.config, work / "scale",
                                            args.scale_clients)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    r = result
    print(f"data | manifest {r['manifest_files_per_s']} files/s (x{r['manifest_speedup_vs_full_decode']} "
          f"vs decode) | mfcc {r['mfcc_audio_s_per_s_per_core']} audio-s/s/core | kmeans fit "
          f"{r['kmeans_fit_audio_s_per_s_per_core']} label {r['kmeans_label_audio_s_per_s_per_core']} "
          f"audio-s/s/core (K={k}) | decode+mfcc+label {r['decode_mfcc_label_audio_s_per_s_per_core']} audio-s/s/core "
          f"({r['decode_mfcc_label_audio_s_per_cpu_s']} per CPU-s; floors: spectrogram alone "
          f"{r['floors']['spectrogram_audio_s_per_cpu_s']}, flac -d alone {r['floors']['flac_cli_decode_audio_s_per_cpu_s']}) "
          f"| cache: client stage {r['feature_cache']['client_s_per_audio_h_without']} -> "
          f"{r['feature_cache']['client_s_per_audio_h_with']} s per audio hour | workers 2 vs 1 "
          f"x{r['workers']['speedup_2_vs_1']} (bundled)")
    if "scale" in r:
        sc = r["scale"]
        print(f"scale tree ({sc['files']} files, {sc['speakers']} speakers) | manifest {sc['manifest_files_per_s']} files/s "
              f"| partition_data.py {sc['partition']['wall_s']} s, peak RSS {sc['partition']['peak_rss_gb']} GB "
              f"| workers 2 vs 1 x{sc['workers']['speedup_2_vs_1']} on {sc['workers']['clients']} clients")


if __name__ == "__main__":
    main()
