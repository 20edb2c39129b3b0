"""Training-step throughput of HubertBase vs torchaudio's hubert_pretrain_model at the same config.

Both models run the same batch (random waveforms, random cluster targets), the same loss (fairseq's
hubert criterion: masked CE per masked frame + 10 x feature penalty) and AdamW, interleaved step by step
in one process so that machine load hits both alike. Reports audio seconds trained per wall second.

    python benchmarks/bench_model.py                       # tiny + base, fp32 + bf16, 1 warm-up + 3 steps
    python benchmarks/bench_model.py --sizes tiny --steps 5 --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedhubert.config import Config, ModelConfig, load_config, num_frames  # noqa: E402
from fedhubert.fileio import atomic_write_text  # noqa: E402
from fedhubert.model import CONV_LAYERS, HubertBase, fairseq_mask_prob  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def model_config(size: str) -> ModelConfig:
    """tiny = the demo config's model (configs/demo.yaml); base = HuBERT Base (the defaults)."""
    return load_config(ROOT / "configs" / "demo.yaml").model if size == "tiny" else Config().model


def torchaudio_model(m: ModelConfig, mask_prob: float, mask_length: int) -> torch.nn.Module:
    from torchaudio.models import hubert_pretrain_model

    return hubert_pretrain_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(m.conv_dim, k, s) for k, s in CONV_LAYERS],
        extractor_conv_bias=False, encoder_embed_dim=m.hidden_size, encoder_projection_dropout=m.feat_proj_dropout,
        encoder_pos_conv_kernel=m.conv_pos, encoder_pos_conv_groups=m.conv_pos_groups,
        encoder_num_layers=m.num_hidden_layers, encoder_num_heads=m.num_attention_heads,
        encoder_attention_dropout=m.attention_dropout, encoder_ff_interm_features=m.intermediate_size,
        encoder_ff_interm_dropout=m.activation_dropout, encoder_dropout=m.hidden_dropout,
        encoder_layer_norm_first=m.layer_norm_first, encoder_layer_drop=m.layerdrop,
        mask_prob=fairseq_mask_prob(mask_prob, mask_length), mask_selection="static", mask_other=0.0,
        mask_length=mask_length, no_mask_overlap=False, mask_min_space=1, mask_channel_prob=0.0,
        mask_channel_selection="static", mask_channel_other=0.0, mask_channel_length=10,
        no_mask_channel_overlap=False, mask_channel_min_space=1, skip_masked=False, skip_nomask=False,
        num_classes=m.vocab_size, final_dim=m.final_dim, feature_grad_mult=m.feature_grad_mult)


def hubert_step(model: HubertBase, optimizer: torch.optim.Optimizer, wav: torch.Tensor, targets: torch.Tensor,
                autocast, scaler: torch.amp.GradScaler | None = None):
    """A closure running one training step of ``model`` (fwd + loss + bwd + optimizer) on the batch, in
    ``autocast``; with ``scaler`` (fp16) the loss is scaled as training does. Returns the loss."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)

    def step() -> float:
        with autocast:
            loss = model.pretraining_step(wav, None, targets).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()
    return step


def make_steps(size: str, precision: str, batch: int, samples: int, seed: int):
    """Two closures running one optimizer step each: ours and torchaudio's."""
    torch.manual_seed(seed)
    m = model_config(size)
    wav = torch.randn(batch, samples) * 0.1
    targets = torch.randint(4, m.vocab_size, (batch, num_frames(samples)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    ours = HubertBase(m).train()
    ours_step = hubert_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), wav, targets, autocast)
    ref = torchaudio_model(m, 0.08, 10).train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

    def ref_step() -> float:
        with autocast:
            logit_m, _logit_u, penalty = ref(wav, targets)
            ce = F.cross_entropy(logit_m.float(), torch.zeros(len(logit_m), dtype=torch.long), reduction="sum")
            loss = ce / max(len(logit_m), 1) + 10.0 * penalty.float()
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        return loss.item()

    return ours_step, ref_step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(size: str, precision: str, args: argparse.Namespace) -> dict:
    samples = int(args.seconds * 16000)
    ours_step, ref_step = make_steps(size, precision, args.batch, samples, args.seed)
    for _ in range(args.warmup):
        ours_step(), ref_step()
    ours_t, ref_t = [], []
    for i in range(args.steps):  # interleaved, alternating who goes first
        pair = [(ours_t, ours_step), (ref_t, ref_step)]
        for times, fn in (pair if i % 2 == 0 else pair[::-1]):
            times.append(timed(fn))
    audio = args.batch * args.seconds
    ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
    return {"size": size, "precision": precision, "batch": args.batch, "seconds_per_utterance": args.seconds,
            "steps": args.steps, "ours_s_per_step": ours_s, "torchaudio_s_per_step": ref_s,
            "ours_audio_s_per_s": audio / ours_s, "torchaudio_audio_s_per_s": audio / ref_s,
            "speedup": ref_s / ours_s, "ours_all_s": ours_t, "torchaudio_all_s": ref_t}


def table(rows: list[dict]) -> str:
    lines = ["| model | precision | ours s/step | torchaudio s/step | ours audio s/s | torchaudio audio s/s | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['precision']} | {r['ours_s_per_step']:.3f} | {r['torchaudio_s_per_step']:.3f} "
                     f"| {r['ours_audio_s_per_s']:.2f} | {r['torchaudio_audio_s_per_s']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,base", help="comma list of tiny, base")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (CPU autocast)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.5, help="seconds of audio per utterance")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model.json"))
    args = parser.parse_args()

    rows = []
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            rows.append(run_case(size, precision, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {"benchmark": "training step (fwd + loss + bwd + AdamW), HubertBase vs torchaudio hubert_pretrain_model",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
              platform.machine(), "goal": "ours >= 1.3x torchaudio", "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
