"""Data-stage speed on the bundled corpus (or --root): manifest building and label generation.

Reports, as JSON (stdout and benchmarks/results/data.json) plus one table line:
  manifest   files/s of the header-only scan (data.scan_workers threads), and the ratio against a
             reference scan that decodes every file (what a header-less scan would cost);
  mfcc       audio seconds per wall second per core (one torch thread), and the ratio against torch's
             default thread count on the same audio;
  kmeans     audio seconds per wall second per core for fitting (partial_fit, fit_passes passes) and
             for labelling (predict), with BLAS/OpenMP limited to one thread;
  decode     audio seconds per wall second of soundfile decoding + resampling (load_audio).
Usage: python benchmarks/bench_data.py [--root DIR] [--max-files N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import soundfile as sf
import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedhubert.audio import load_audio  # noqa: E402
from fedhubert.config import load_config, num_frames  # noqa: E402
from fedhubert.librispeech import scan_corpus  # noqa: E402
from fedhubert.features import MfccFeatures, single_torch_thread  # noqa: E402
from fedhubert.targets import cluster_count, fit_kmeans  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / "corpus" / "LibriSpeech"), help="LibriSpeech root")
    parser.add_argument("--config", default=str(REPO / "configs" / "pretraining_config.yaml"))
    parser.add_argument("--max-files", type=int, default=400, help="utterances used for label timing")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.librispeech_root={args.root}"])
    sr = cfg.data.sample_rate

    # Manifest: header-only scan (warm file cache: one untimed pass first) vs a full-decode reference.
    every = sorted(d.name for d in Path(args.root).iterdir() if d.is_dir())  # a speed test: dev/test sets too
    scan = lambda: scan_corpus(args.root, every, sr, cfg.data.min_audio_length, cfg.data.scan_workers)  # noqa: E731
    scan()
    (rows, _), t_scan = timed(scan)
    _, t_decode_ref = timed(lambda: [sf.read(Path(args.root) / r.path, dtype="float32") for r in rows])

    # Label generation on (up to) max_files utterances, spread over the corpus.
    picked = rows[:: max(1, len(rows) // args.max_files)][: args.max_files]
    audio_s = sum(r.num_samples for r in picked) / sr
    with single_torch_thread():
        wavs, t_load = timed(lambda: [load_audio(Path(args.root) / r.path, sr) for r in picked])
        features = MfccFeatures(cfg)
        features(wavs[0])  # warm-up
        feats, t_mfcc = timed(lambda: [features(w) for w in wavs])
    default_threads = torch.get_num_threads()
    _, t_mfcc_default = timed(lambda: [features(w) for w in wavs])
    frames = sum(len(f) for f in feats)
    assert frames == sum(num_frames(r.num_samples) for r in picked)

    k = cluster_count(frames, cfg, "benchmark")
    chunk = max(cfg.kmeans.batch_size, k)
    with threadpool_limits(1):
        km, t_fit = timed(lambda: fit_kmeans(lambda p: iter(feats), features.dim, k, chunk,
                                             cfg.kmeans.fit_passes, cfg.seed))
        _, t_predict = timed(lambda: [km.predict(f) for f in feats])

    result = {
        "corpus": str(Path(args.root).resolve()), "files": len(rows), "label_utterances": len(picked),
        "label_audio_seconds": round(audio_s, 1), "frames": frames, "n_clusters": k, "chunk": chunk,
        "fit_passes": cfg.kmeans.fit_passes, "scan_workers": cfg.data.scan_workers,
        "manifest_files_per_s": round(len(rows) / t_scan, 1),
        "manifest_speedup_vs_full_decode": round(t_decode_ref / t_scan, 2),
        "decode_audio_s_per_s": round(audio_s / t_load, 1),
        "mfcc_audio_s_per_s_per_core": round(audio_s / t_mfcc, 1),
        "mfcc_speedup_vs_default_threads": round(t_mfcc_default / t_mfcc, 2),
        "torch_default_threads": default_threads,
        "kmeans_fit_audio_s_per_s_per_core": round(audio_s / t_fit, 1),
        "kmeans_label_audio_s_per_s_per_core": round(audio_s / t_predict, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    r = result
    print(f"data | manifest {r['manifest_files_per_s']} files/s (x{r['manifest_speedup_vs_full_decode']} "
          f"vs decode) | mfcc {r['mfcc_audio_s_per_s_per_core']} audio-s/s/core | kmeans fit "
          f"{r['kmeans_fit_audio_s_per_s_per_core']} label {r['kmeans_label_audio_s_per_s_per_core']} "
          f"audio-s/s/core (K={k})")


if __name__ == "__main__":
    main()
