"""The GPU path in one table: a training step in fp32, bf16 and fp16 (+GradScaler) with SDPA attention (audio
seconds per second, model FLOP/s and its share of the device's peak), batch_size=auto's choice and the peak
memory training at it reaches, gradient checkpointing's memory saving, a 1-round federated simulation with
client_num_gpus 0.5, and the s3prl load check. On a machine without CUDA it runs the CPU parts at a small
size and prints one "skipped (no CUDA): ..." line for each GPU-only part.

    benchmarks/gpu_check.sh                  # sets up .venv, then this with the defaults of the machine
    python benchmarks/gpu_check.py --smoke   # the smallest CPU run (the test's): tiny model, 1 step

Every memory figure is measured in a fresh process (CPU peak RSS would otherwise hide memory the allocator
kept from an earlier part), unless --in-process. Writes benchmarks/results/gpu_check.json."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import hubert_step, model_config, timed  # noqa: E402
from fedhubert.config import load_config, num_frames  # noqa: E402
from fedhubert.fileio import atomic_write_text  # noqa: E402
from fedhubert.memory import MiB, PeakMemory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

# Dense peak TFLOP/s by device-name fragment (vendor data sheets; fp32 is plain FP32, not TF32, which
# torch leaves off for matmuls by default). First match wins: the more specific names come first.
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for ``precision``, or None when the device is not in the table."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks[precision]
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


# --- Parts, each runnable alone (in a fresh process: `--part NAME --json ARGS`) ---------------------------

def step_part(args: argparse.Namespace, precision: str, checkpointing: bool = False) -> dict:
    """Seconds per training step (median of args.steps after one warm-up), the peak memory of the steps
    above the resting model, and (fp32, once) the FLOPs of one fwd+bwd counted on the math attention path."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    m = model_config(args.size)
    samples = int(args.seconds * 16000)
    wav = (torch.randn(args.batch, samples) * 0.1).to(device)
    targets = torch.randint(4, m.vocab_size, (args.batch, num_frames(samples))).to(device)
    from fedhubert.model import HubertBase

    model = HubertBase(m).to(device).train()
    model.gradient_checkpointing = checkpointing
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    with PeakMemory(device) as mem:
        step = hubert_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), wav, targets, autocast, scaler)
        step()  # warm-up: kernels chosen, AdamW state made
        times = sorted(timed(lambda: (step(), device.type == "cuda" and torch.cuda.synchronize(device)))
                       for _ in range(args.steps))
    row = {"part": "step", "precision": precision, "checkpointing": checkpointing, "size": args.size,
           "batch": args.batch, "seconds": args.seconds, "s_per_step": times[len(times) // 2],
           "peak_bytes": mem.peak_bytes}
    row["audio_s_per_s"] = args.batch * args.seconds / row["s_per_step"]
    if precision == "fp32" and not checkpointing:
        row["flops_per_step"] = count_flops(model, wav, targets)
    return row


def count_flops(model: torch.nn.Module, wav: torch.Tensor, targets: torch.Tensor) -> float:
    """FLOPs of one fwd+bwd (the optimizer's few per parameter left out), on SDPA's math path so that the
    counter sees attention's matmuls on every device (it has no formula for the fused CPU kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model.pretraining_step(wav, None, targets).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def auto_batch_part(args: argparse.Namespace) -> dict:
    """batch_size=auto on a model of args.size at args.seconds crops: its choice and predicted peak, then the
    peak memory (above the resting model, probes included) of 2 training steps at that batch."""
    from fedhubert.config import Config
    from fedhubert.data import synthetic_batch
    from fedhubert.model import HubertBase
    from fedhubert.train import plan_auto_batch, train_local

    device = torch.device(args.device)
    overrides = [f"training.memory_budget_gb={args.budget_gb}", "training.batch_size=auto",
                 "training.max_local_steps=2", f"data.max_audio_length={int(args.seconds * 16000)}",
                 f"training.device={args.device}"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides) if args.size == "tiny" else \
        load_config(ROOT / "configs" / "pretraining_config.yaml", overrides)
    assert isinstance(cfg, Config)
    model = HubertBase(cfg.model)
    with PeakMemory(device) as mem:
        plan = plan_auto_batch(cfg, model, device)
        probes = mem.so_far()  # train_local resets the CPU high-water mark: read the probes' first
        batches = [synthetic_batch(cfg, plan.size, seed=i) for i in range(2)]  # full crops: the worst case
        train_local(model, batches, cfg, device, seed=0)
    return {"part": "auto_batch", "size": args.size, "seconds": args.seconds, "batch": plan.size,
            "precision": cfg.training.precision,
            "budget_bytes": plan.budget, "predicted_peak_bytes": plan.predicted_peak,
            "per_crop_bytes": plan.per_sample, "peak_bytes": max(probes, mem.peak_bytes)}


def s3prl_part(args: argparse.Namespace, checkpoint: str | None = None, cfg_overrides: tuple[str, ...] = ()) -> dict:
    """check_s3prl_load on ``checkpoint`` (default: a fresh tiny model saved as a checkpoint) with partitions of
    the bundled corpus made in a temporary folder."""
    from fedhubert.checkpoint import save_checkpoint
    from fedhubert.evaluate import check_s3prl_load
    from fedhubert.model import HubertBase

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.partitions_dir={tmp}/partitions", *cfg_overrides])
        if not (Path(cfg.data.partitions_dir) / "client_0" / "valid.tsv").is_file():
            run_stage("partition_data.py", [*cfg_overrides, f"data.partitions_dir={tmp}/partitions"])
        if checkpoint is None:
            checkpoint = f"{tmp}/fresh.pt"
            save_checkpoint(checkpoint, HubertBase(cfg.model), cfg)
        start = time.perf_counter()
        hidden = check_s3prl_load(cfg, checkpoint)
    return {"part": "s3prl", "hidden_states": hidden, "seconds_taken": time.perf_counter() - start}


def run_stage(script: str, overrides: list[str], timeout: float = 600) -> float:
    """Runs one of the project's stage scripts on configs/demo.yaml with ``overrides``; its wall seconds."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / script), "--config", str(ROOT / "configs" / "demo.yaml"), *sets],
                         cwd=ROOT, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def simulation_part(args: argparse.Namespace) -> dict:
    """The demo's chain, 1 round, 2 local steps, two clients sharing the GPU (client_num_gpus 0.5; 0 on a CPU
    device), then the s3prl load check of its best model."""
    gpus = 0.5 if torch.device(args.device).type == "cuda" else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"data.partitions_dir={tmp}/partitions", f"federation.checkpoint_dir={tmp}/checkpoints",
                "federation.num_rounds=1", "training.max_local_steps=2", "partition.num_clients=2",
                f"federation.client_num_gpus={gpus}", f"training.device={args.device}", "kmeans.n_clusters=20"]
        seconds = {s: run_stage(s, sets) for s in ("partition_data.py", "generate_kmeans_targets.py",
                                                    "federated_hubert_pretraining.py")}
        metrics_file = Path(tmp) / "checkpoints" / "metrics.jsonl"
        metrics = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
        s3prl = s3prl_part(args, f"{tmp}/checkpoints/server/best_global_model.pt", tuple(sets))
    return {"part": "simulation", "stage_seconds": seconds, "rounds_logged": len(metrics),
            "s3prl_hidden_states": s3prl["hidden_states"]}


PARTS = {"step": step_part, "auto_batch": auto_batch_part, "s3prl": s3prl_part, "simulation": simulation_part}


def run_part(args: argparse.Namespace, name: str, **kw) -> dict:
    """A part in a fresh process (its memory figures then start from a clean allocator), or in this one."""
    if args.in_process or name == "simulation":  # the simulation's stages are processes of their own
        return PARTS[name](args, **kw)
    cmd = [sys.executable, __file__, "--part", name, "--part-kwargs", json.dumps(kw), *args.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"gpu_check: part {name} {kw or ''} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- The table --------------------------------------------------------------------------------------------

def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / MiB:.0f} MiB"


def step_line(row: dict, flops: float | None, name: str) -> str:
    tflops = flops / row["s_per_step"] / 1e12 if flops else None
    peak = peak_tflops(name, row["precision"]) if tflops is not None else None
    share = f"{100 * tflops / peak:.1f}% of the {peak:.0f} peak" if peak else "peak unknown for this device"
    rate = f"{tflops:.1f} TFLOP/s" if tflops and tflops >= 0.1 else f"{(tflops or 0) * 1e3:.1f} GFLOP/s"
    flop_text = f"{rate} ({share})" if tflops is not None else "FLOPs not counted"
    return (f"| step {row['size']} {row['precision']}{' +GradScaler' if row['precision'] == 'fp16' else ''} "
            f"({row['batch']} x {row['seconds']:g} s, SDPA) | {row['s_per_step']:.3f} s/step, "
            f"{row['audio_s_per_s']:.3g} audio s/s, {flop_text}, peak {gib(row['peak_bytes'])} |")


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    cuda = torch.cuda.is_available()
    parser.add_argument("--smoke", action="store_true", help="the smallest CPU run: tiny model, 1 crop of 1 s, 1 step")
    # CPU defaults: the demo's model (a Base bf16 step takes ~1.5 min on a CPU without bf16 units; --size base)
    parser.add_argument("--size", default="base" if cuda else "tiny", choices=("tiny", "base"),
                        help="HuBERT Base or the demo's model")
    parser.add_argument("--batch", type=int, default=8 if cuda else 2, help="crops per step in the step rows")
    parser.add_argument("--seconds", type=float, default=10.0 if cuda else 2.5, help="seconds per crop")
    parser.add_argument("--steps", type=int, default=5 if cuda else 1, help="timed steps (median), after 1 warm-up")
    parser.add_argument("--budget-gb", type=float, default=0.0 if cuda else 1.0,
                        help="training.memory_budget_gb of the auto row (0: the default, half the free memory)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu forces the CPU parts on a GPU machine")
    parser.add_argument("--in-process", action="store_true", help="no fresh process per part (memory less exact)")
    parser.add_argument("--skip", default="", help="comma list of parts not to run: s3prl, simulation")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.seconds, args.steps, args.budget_gb = "tiny", 1, 1.0, 1, 0.35
    args.passthrough = ["--size", args.size, "--batch", str(args.batch), "--seconds", str(args.seconds),
                        "--steps", str(args.steps), "--budget-gb", str(args.budget_gb), "--device", args.device]
    if args.part:  # a child: one part, its JSON on the last line
        print(json.dumps(PARTS[args.part](args, **json.loads(args.part_kwargs))))
        return []
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    name = device_name(device)
    started = time.perf_counter()
    lines = ["| check | result |", "|---|---|",
             f"| machine | {name}, torch {torch.__version__}, {torch.get_num_threads()} threads |"]
    rows: list[dict] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    print("\n".join(lines), flush=True)
    flops = None
    for precision in ("fp32", "bf16", "fp16"):
        if precision == "fp16" and not on_cuda:
            emit("| step fp16 +GradScaler | skipped (no CUDA): fp16 training needs a CUDA device |")
            continue
        row = run_part(args, "step", precision=precision)
        flops = row.get("flops_per_step", flops)
        rows.append(row)
        emit(step_line(row, flops, name))
    auto = run_part(args, "auto_batch")
    rows.append(auto)
    fits = "within" if auto["peak_bytes"] <= auto["budget_bytes"] else "OVER"
    emit(f"| batch_size auto ({auto['size']} {auto['precision']}, {auto['seconds']:g} s crops) | "
         f"{auto['batch']} crops (~{gib(auto['per_crop_bytes'])} a crop); predicted peak "
         f"{gib(auto['predicted_peak_bytes'])}, measured "
         f"{gib(auto['peak_bytes'])}: {fits} the {gib(auto['budget_bytes'])} budget |")
    ckpt_precision = "bf16" if on_cuda else "fp32"
    plain = next(r for r in rows if r.get("precision") == ckpt_precision and r["part"] == "step")
    ckpt = run_part(args, "step", precision=ckpt_precision, checkpointing=True)
    rows.append(ckpt)
    saved = plain["peak_bytes"] - ckpt["peak_bytes"]
    share = 100 * max(saved, 0) / max(plain["peak_bytes"], 1)  # at 1 crop, noise can read a few MiB the other way
    emit(f"| gradient checkpointing ({ckpt_precision}, {args.batch} x {args.seconds:g} s) | peak "
         f"{gib(ckpt['peak_bytes'])} vs {gib(plain['peak_bytes'])} without: saves {gib(max(saved, 0))} "
         f"({share:.0f}%), {ckpt['s_per_step'] / plain['s_per_step']:.2f}x the step time |")
    skip = set(filter(None, args.skip.split(",")))
    if on_cuda and "simulation" in skip:
        emit("| 1-round simulation, client_num_gpus 0.5 | skipped (--skip simulation) |")
    elif on_cuda:
        sim = run_part(args, "simulation")
        rows.append(sim)
        stages = ", ".join(f"{Path(s).stem} {t:.0f} s" for s, t in sim["stage_seconds"].items())
        logged = f"rounds 0-{sim['rounds_logged'] - 1} logged" if sim["rounds_logged"] else "NO round logged"
        emit(f"| 1-round simulation, client_num_gpus 0.5 | {logged} (0: the initial model; {stages}); "
             f"s3prl loads its best model: {sim['s3prl_hidden_states']} hidden states |")
    else:
        emit("| 1-round simulation, client_num_gpus 0.5 | skipped (no CUDA): clients sharing a GPU need one "
             "(the CPU simulation is run by the test suite) |")
    if not on_cuda and "s3prl" in skip:
        emit("| s3prl load check | skipped (--skip s3prl) |")
    elif not on_cuda:
        s3prl = run_part(args, "s3prl")
        rows.append(s3prl)
        emit(f"| s3prl load check (a fresh tiny model) | {s3prl['hidden_states']} hidden states |")
    emit(f"| total | {time.perf_counter() - started:.0f} s |")
    result = {"device": name, "torch": torch.__version__, "cuda": on_cuda, "args": args.passthrough, "rows": rows,
              "table": lines}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return lines


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
