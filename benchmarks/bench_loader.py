"""Audio seconds per wall second of a client's loader alone against the HuBERT training step it feeds.

The loader is the project's own (data.make_loader: training crops of data.max_audio_length, shuffled,
collated), timed over whole passes of a client folder built from real utterances, in two ways: range
reads (a crop decodes only its own frames, as training does) and whole-file decodes sliced (as before
issue 12), each with 0, 1 and 2 worker processes (training.loader_workers). The step is a full
optimizer step (fwd + loss + bwd + AdamW) of the configured model (HuBERT Base by default) on full crops.
The ratio loader / step must be far above 1: then the loader never holds the step up.

    python benchmarks/bench_loader.py                           # CPU: fp32 Base step of 1 and 2 crops
    python benchmarks/bench_loader.py --device cuda --precision bf16 --step-batches 8,16,32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedhubert import data  # noqa: E402
from fedhubert.audio import load_audio  # noqa: E402
from fedhubert.config import Config, load_config, num_frames  # noqa: E402
from fedhubert.data import make_loader, synthetic_batch  # noqa: E402
from fedhubert.fileio import atomic_write_text  # noqa: E402
from fedhubert.model import HubertBase  # noqa: E402
from fedhubert.train import autocast, pretraining_loss, resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def whole_decode(path, sample_rate: int, offset: int, length: int) -> tuple[torch.Tensor, int]:  # noqa: ANN001
    """The crop as the loader read it before range reads: the whole file decoded, then sliced."""
    wav = load_audio(path, sample_rate)
    return wav[offset:offset + length].clone(), int(wav.shape[-1])


def build_client(audio_root: Path, folder: Path, cfg: Config, limit: int) -> tuple[int, float]:
    """folder/train.tsv and .km (label 0 everywhere: the loader's cost does not depend on the ids) over
    the first ``limit`` audio files under ``audio_root``; returns (utterances, mean seconds)."""
    files = sorted(p for p in audio_root.rglob("*") if p.suffix in (".flac", ".wav"))[:limit]
    if not files:
        raise SystemExit(f"no .flac or .wav files under {audio_root}")
    sizes = [sf.info(str(p)).frames for p in files]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join([str(audio_root)] + [f"{p.relative_to(audio_root)}\t{n}"
                                                                        for p, n in zip(files, sizes)]) + "\n")
    (folder / "train.km").write_text("\n".join(" ".join(["0"] * num_frames(n)) for n in sizes) + "\n")
    return len(files), sum(sizes) / len(sizes) / cfg.data.sample_rate


def time_loader(folder: Path, cfg: Config, *, batch: int, workers: int, passes: int, whole: bool) -> dict:
    """Audio seconds per second over ``passes`` timed passes, after one untimed pass (workers starting,
    the page cache warming)."""
    data.load_crop, real = (whole_decode if whole else data.load_crop), data.load_crop  # forked workers inherit it
    try:
        loader = make_loader(folder, "train", cfg, batch_size=batch, seed=0, train=True, num_workers=workers)
        started = time.perf_counter()
        for _ in loader:
            pass
        first = time.perf_counter() - started
        samples, started = 0, time.perf_counter()
        for _ in range(passes):
            samples += sum(sum(b.num_samples) for b in loader)
        elapsed = time.perf_counter() - started
        del loader  # its persistent workers stop
    finally:
        data.load_crop = real
    audio_s = samples / cfg.data.sample_rate
    return {"reads": "whole file" if whole else "range", "workers": workers, "batch": batch, "passes": passes,
            "audio_s": audio_s, "seconds": elapsed, "first_pass_s": first, "audio_s_per_s": audio_s / elapsed}


def time_step(cfg: Config, device: torch.device, batch: int, warmup: int, steps: int) -> dict:
    """Median seconds of one optimizer step on ``batch`` full crops."""
    torch.manual_seed(0)
    model = HubertBase(cfg.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    crops = synthetic_batch(cfg, batch).to(device)
    loss_fn = pretraining_loss(cfg)

    def step() -> float:
        started = time.perf_counter()
        with autocast(cfg, device):
            loss = loss_fn(model, crops).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the device
        return time.perf_counter() - started

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    seconds = statistics.median(times)
    audio_s = batch * cfg.data.max_audio_length / cfg.data.sample_rate
    return {"batch": batch, "precision": cfg.training.precision, "device": str(device), "s_per_step": seconds,
            "all_s": times, "audio_s_per_s": audio_s / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="config file (default: the defaults: HuBERT Base, 2.5 s crops)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--audio", default=str(ROOT / "corpus" / "LibriSpeech"), help="folder of .flac/.wav files")
    parser.add_argument("--limit", type=int, default=100, help="at most this many files")
    parser.add_argument("--loader-batch", type=int, default=8, help="crops per loader batch")
    parser.add_argument("--workers", default="0,1,2", help="comma list of loader worker counts")
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the files per loader case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--step-batches", default="1,2", help="comma list of crops per training step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per batch size (median reported)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides + [f"training.precision={args.precision}"])
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        count, mean_s = build_client(Path(args.audio), Path(tmp) / "client_0", cfg, args.limit)
        print(f"{count} utterances, mean {mean_s:.2f} s; crops of {cfg.data.max_audio_length} samples", flush=True)
        loaders = []
        for whole in (False, True):
            for workers in (int(w) for w in args.workers.split(",")):
                loaders.append(time_loader(Path(tmp) / "client_0", cfg, batch=args.loader_batch, workers=workers,
                                           passes=args.passes, whole=whole))
                r = loaders[-1]
                print(f"loader {r['reads']:>10}, {workers} workers: {r['audio_s_per_s']:8.1f} audio s/s", flush=True)
    steps = []
    for batch in (int(b) for b in args.step_batches.split(",")):
        steps.append(time_step(cfg, device, batch, args.warmup, args.steps))
        print(f"step {batch} crops ({args.precision}, {device}): {steps[-1]['s_per_step']:.2f} s, "
              f"{steps[-1]['audio_s_per_s']:.2f} audio s/s", flush=True)
    fastest = max(s["audio_s_per_s"] for s in steps)
    for r in loaders:
        r["ratio_to_fastest_step"] = r["audio_s_per_s"] / fastest
    result = {"benchmark": "client loader alone vs the training step, audio seconds per second",
              "utterances": count, "mean_utterance_s": mean_s, "crop_samples": cfg.data.max_audio_length,
              "model": {"hidden_size": cfg.model.hidden_size, "layers": cfg.model.num_hidden_layers},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "loader": loaders, "step": steps,
              "goal": "loader audio s/s >> step audio s/s (ratio >> 1)"}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print("| reads | workers | loader audio s/s | / fastest step |\n|---|---|---|---|")
    for r in loaders:
        print(f"| {r['reads']} | {r['workers']} | {r['audio_s_per_s']:.1f} | {r['ratio_to_fastest_step']:.0f}x |")
    print(f"fastest step: {fastest:.2f} audio s/s; wrote {args.out}")


if __name__ == "__main__":
    main()
