"""benchmarks/gpu_check.py: on a machine without CUDA its table has the CPU rows and one "skipped (no CUDA)" line
for each GPU-only part (forced onto the CPU here, so the test is the same on every machine); and batch_size=auto
on CPU picks a batch whose real peak, measured in a fresh process, lands inside the budget without wasting it."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cpu_table_says_what_it_skipped(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    lines = gpu_check.main(["--smoke", "--in-process", "--device", "cpu", "--skip", "s3prl", "--out", str(out)])
    table = "\n".join(lines)
    assert lines[0] == "| check | result |" and all(l.startswith("|") and l.endswith("|") for l in lines)
    for precision in ("fp32", "bf16"):
        assert f"| step tiny {precision} (1 x 1 s, SDPA) |" in table
    assert "| step fp16 +GradScaler | skipped (no CUDA)" in table
    assert "| 1-round simulation, client_num_gpus 0.5 | skipped (no CUDA)" in table
    assert "| batch_size auto (tiny fp32, 1 s crops) |" in table and "| gradient checkpointing (fp32" in table
    assert "| s3prl load check | skipped (--skip s3prl) |" in table
    assert "GFLOP/s (peak unknown for this device)" in table  # FLOPs counted; no peak for a CPU
    result = json.loads(out.read_text())
    steps = [r for r in result["rows"] if r["part"] == "step"]
    assert steps[0]["flops_per_step"] > 1e9 and all(r["s_per_step"] > 0 for r in steps)
    assert result["table"] == lines


def test_peak_table_lookup(gpu_check) -> None:
    assert gpu_check.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert gpu_check.peak_tflops("x86_64", "fp32") is None


def test_auto_batch_on_cpu_fits_the_budget_and_uses_it() -> None:
    """The old estimate (a 1- and a 2-crop probe, each from its own start) read 1-27 MiB a crop where a 1 s crop
    of the demo model needs ~35, and chose 9-64 crops for this budget (at 2 s crops and 1 GiB: 64 crops, whose
    training peaked at 2.4 GiB). Measured in a fresh process, so no earlier test's allocator state hides memory."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--part", "auto_batch", "--size", "tiny",
           "--seconds", "1", "--budget-gb", "0.35", "--device", "cpu"]
    row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    budget, peak = row["budget_bytes"], row["peak_bytes"]
    assert peak <= budget, row  # fits
    assert peak >= 0.6 * budget, row  # and is not needlessly small
    assert abs(row["predicted_peak_bytes"] - peak) <= 0.2 * budget, row  # the prediction is what happens


def test_the_cuda_table_from_its_parts(gpu_check, monkeypatch, tmp_path: Path) -> None:
    """The CUDA branch's rows, from parts that report made-up figures (no GPU needed): FLOP/s against the H200's
    peak, fp16 run rather than skipped, the simulation and its s3prl check."""
    def fake_part(args, name, precision="fp32", checkpointing=False):
        if name == "step":
            row = {"part": "step", "precision": precision, "checkpointing": checkpointing, "size": args.size,
                   "batch": args.batch, "seconds": args.seconds, "s_per_step": 0.5,
                   "peak_bytes": (20 if checkpointing else 30) * 2**30, "audio_s_per_s": 160.0}
            return {**row, "flops_per_step": 1e14} if precision == "fp32" and not checkpointing else row
        if name == "auto_batch":
            return {"part": "auto_batch", "size": "base", "precision": "fp32", "seconds": 10.0, "batch": 40,
                    "budget_bytes": 70 * 2**30, "predicted_peak_bytes": 60 * 2**30, "per_crop_bytes": 2**30,
                    "peak_bytes": 58 * 2**30}
        return {"part": "simulation", "rounds_logged": 2, "s3prl_hidden_states": 5,
                "stage_seconds": {"partition_data.py": 5.0, "generate_kmeans_targets.py": 9.0,
                                  "federated_hubert_pretraining.py": 60.0}}

    monkeypatch.setattr(gpu_check, "run_part", fake_part)
    monkeypatch.setattr(gpu_check, "device_name", lambda device: "NVIDIA H200")
    table = "\n".join(gpu_check.main(["--device", "cuda", "--size", "base", "--batch", "8", "--seconds", "10",
                                       "--out", str(tmp_path / "out.json")]))
    assert "skipped" not in table
    assert "| step base fp32 (8 x 10 s, SDPA) | 0.500 s/step, 160 audio s/s, 200.0 TFLOP/s (298.5% of the 67" in table
    assert "| step base bf16 (8 x 10 s, SDPA) | 0.500 s/step, 160 audio s/s, 200.0 TFLOP/s (20.2% of the 989" in table
    assert "| step base fp16 +GradScaler (8 x 10 s, SDPA) |" in table
    assert "40 crops (~1.00 GiB a crop); predicted peak 60.00 GiB, measured 58.00 GiB: within the 70.00 GiB" in table
    assert ("| gradient checkpointing (bf16, 8 x 10 s) | peak 20.00 GiB vs 30.00 GiB without: saves 10.00 GiB (33%)"
            in table)
    assert "| 1-round simulation, client_num_gpus 0.5 | rounds 0-1 logged" in table and "5 hidden states" in table
