"""Student vs teacher, in the same run: parameters, checkpoint bytes, forward throughput (audio seconds
per wall second on the same input, eval mode, no gradients), training-step throughput (the student's
distillation step against the teacher's own pretraining step, each with AdamW), and the bytes one
client sends per round (float32 wire: what travels in pretraining vs in distillation).

Teacher and student alternate step by step so that machine load hits both alike; medians are reported.

    python benchmarks/bench_distillation.py                          # demo and default (Base -> 384 x 6) sizes
    python benchmarks/bench_distillation.py --sizes demo --steps 5
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedhubert.checkpoint import save_checkpoint  # noqa: E402
from fedhubert.config import Config, load_config, num_frames  # noqa: E402
from fedhubert.data import Batch  # noqa: E402
from fedhubert.distill import (DistillationLoss, DistillationModel, student_config,  # noqa: E402
                               target_layers)
from fedhubert.federation.task import is_head_param, split_state  # noqa: E402
from fedhubert.fileio import atomic_write_text  # noqa: E402
from fedhubert.model import HubertBase  # noqa: E402
from fedhubert.train import pretraining_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def configs(size: str) -> Config:
    """demo: configs/demo_distillation.yaml; default: configs/distillation_config.yaml (Base teacher)."""
    name = "demo_distillation.yaml" if size == "demo" else "distillation_config.yaml"
    return load_config(ROOT / "configs" / name)


def batch_of(cfg: Config, batch: int, samples: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    frames = num_frames(samples)
    return Batch(0.1 * torch.randn(batch, samples, generator=gen), torch.zeros(batch, samples, dtype=torch.bool),
                 torch.randint(4, cfg.model.vocab_size, (batch, frames), generator=gen), [samples] * batch,
                 list(range(batch)), [0] * batch)


def checkpoint_bytes(model: HubertBase, cfg: Config) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        save_checkpoint(path, model, cfg)
        return path.stat().st_size


def median_seconds(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Each closure once as warm-up, then ``repeats`` times interleaved; the median seconds of each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(size: str, batch: int, samples: int, steps: int) -> dict:
    cfg = configs(size)
    torch.manual_seed(cfg.seed)
    teacher = HubertBase.from_config(cfg)
    layers = target_layers(cfg, cfg.model.num_hidden_layers, "(benchmark)")
    torch.manual_seed(cfg.seed)
    model = DistillationModel(student_config(cfg, cfg.model), cfg.model.hidden_size, layers)
    data = batch_of(cfg, batch, samples)
    audio_s = batch * samples / cfg.data.sample_rate

    def forward(net: HubertBase):
        def run() -> None:
            net.eval()
            with torch.no_grad():
                net.extract_hidden_states(data.waveforms, data.padding_mask)
        return run

    teacher_train = HubertBase.from_config(cfg)  # a trainable copy: the pretraining step's cost
    teacher_train.load_state_dict(teacher.state_dict())
    distill_loss = DistillationLoss(HubertBase.from_config(cfg), student_config(cfg, cfg.model))
    distill_loss.teacher.load_state_dict(teacher.state_dict())

    def train_step(net: torch.nn.Module, loss_fn):
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

        def run() -> None:
            net.train()
            out = loss_fn(net, data)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        return run

    fwd = median_seconds({"teacher": forward(teacher), "student": forward(model.student)}, steps)
    step = median_seconds({"teacher": train_step(teacher_train, pretraining_loss(cfg)),
                           "student": train_step(model, distill_loss)}, steps)
    teacher_shared, _ = split_state(teacher, is_head_param)
    student_shared, _ = split_state(model, DistillationModel.is_local)
    student_cfg = student_config(cfg, cfg.model)
    rows = {}
    for who, net, shared, net_cfg in (("teacher", teacher, teacher_shared, cfg),
                                      ("student", model.student, student_shared, student_cfg)):
        rows[who] = {
            "shape": f"{net.cfg.hidden_size} x {net.cfg.num_hidden_layers}",
            "parameters": sum(p.numel() for p in net.parameters()),
            "checkpoint_bytes": checkpoint_bytes(net, net_cfg),
            "forward_audio_s_per_s": audio_s / fwd[who],
            "train_step_audio_s_per_s": audio_s / step[who],
            "bytes_per_client_per_round": 2 * sum(t.numel() * 4 for t in shared.values()),  # down + up
        }
    ratios = {k: rows["student"][k] / rows["teacher"][k] for k in rows["teacher"] if k != "shape"}
    return {"size": size, "batch": batch, "samples": samples, "steps": steps, "target_layers": layers,
            "teacher": rows["teacher"], "student": rows["student"], "student_over_teacher": ratios}


def table(results: list[dict]) -> str:
    lines = ["| size | model | shape | parameters | checkpoint MB | forward audio s/s | train step audio s/s | MB per client per round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for who in ("teacher", "student"):
            x = r[who]
            lines.append(f"| {r['size']} | {who} | {x['shape']} | {x['parameters'] / 1e6:.2f} M | "
                         f"{x['checkpoint_bytes'] / 1e6:.1f} | {x['forward_audio_s_per_s']:.1f} | "
                         f"{x['train_step_audio_s_per_s']:.1f} | {x['bytes_per_client_per_round'] / 1e6:.1f} |")
        q = r["student_over_teacher"]
        lines.append(f"| {r['size']} | student / teacher | | {q['parameters']:.2f}x | {q['checkpoint_bytes']:.2f}x | "
                     f"{q['forward_audio_s_per_s']:.2f}x | {q['train_step_audio_s_per_s']:.2f}x | "
                     f"{q['bytes_per_client_per_round']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,default", help="comma-separated: demo, default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.5, help="crop length of each utterance")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    samples = int(args.seconds * 16000)
    results = [bench(size, args.batch, samples, args.steps) for size in args.sizes.split(",")]
    out = ROOT / "benchmarks" / "results" / "distillation.json"
    atomic_write_text(out, json.dumps({"machine": platform.processor() or platform.machine(),
                                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
