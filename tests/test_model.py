"""HubertBase: frame geometry, padding, masking statistics, loss/metrics, training, checkpointing, autocast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedhubert.audio import load_audio
from fedhubert.config import ModelConfig, num_frames
from fedhubert.errors import ConfigError
from fedhubert.model import HEAD_PARAM_PREFIXES, HubertBase

ROOT = Path(__file__).resolve().parents[1]
FLACS = sorted((ROOT / "corpus" / "LibriSpeech" / "test-other").rglob("*.flac"))
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  dropout_features=0.0, layerdrop=0.0)


def tiny(**overrides) -> ModelConfig:
    """The demo config's sizes (configs/demo.yaml) with 100 clusters."""
    values = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384, conv_dim=128,
                  final_dim=64, vocab_size=104, layerdrop=0.0)
    return ModelConfig(**{**values, **overrides})


def real_batch(n: int = 4, samples: int = 24000) -> torch.Tensor:
    """n crops of real LibriSpeech speech (different speakers)."""
    return torch.stack([load_audio(path, 16000)[8000:8000 + samples] for path in FLACS[::10][:n]])


def energy_targets(wav: torch.Tensor, classes: int = 20) -> torch.Tensor:
    """Deterministic labels that depend on the audio: quantised frame log-energy, as fairseq ids (+4)."""
    frames = wav.unfold(1, 400, 320)
    energy = frames.pow(2).mean(-1).add(1e-8).log()
    edges = torch.quantile(energy.flatten(), torch.linspace(0, 1, classes + 1)[1:-1])
    return torch.bucketize(energy, edges) + 4


def test_parameter_names_follow_fairseq():
    names = set(HubertBase(tiny()).state_dict())
    expected = {"feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.0.2.weight",
                "feature_extractor.conv_layers.0.2.bias", "feature_extractor.conv_layers.6.0.weight",
                "layer_norm.weight", "post_extract_proj.weight", "mask_emb", "encoder.pos_conv.0.bias",
                "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v", "encoder.layer_norm.bias",
                "encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.self_attn.out_proj.bias",
                "encoder.layers.1.self_attn_layer_norm.weight", "encoder.layers.1.fc1.weight",
                "encoder.layers.1.fc2.bias", "encoder.layers.1.final_layer_norm.weight", "final_proj.weight",
                "label_embs_concat"}
    assert expected <= names
    assert not any(".1.weight" in n and n.startswith("feature_extractor.conv_layers.1.") for n in names)
    head = {n for n in names if n.startswith(HEAD_PARAM_PREFIXES)}
    assert head == {"final_proj.weight", "final_proj.bias", "label_embs_concat"}
    assert "post_extract_proj.weight" not in HubertBase(tiny(conv_dim=96)).state_dict()  # as fairseq


def test_frames_match_num_frames():
    model = HubertBase(tiny()).eval()
    for samples in (400, 719, 720, 16000, 16319, 40000):
        with torch.no_grad():
            hidden, _ = model.extract_hidden_states(torch.randn(1, samples))
        assert len(hidden) == 3 and hidden[0].shape == (1, num_frames(samples), 96)
    with pytest.raises(ValueError, match="at least 400"):
        model.extract_hidden_states(torch.randn(1, 399))


def test_frame_padding_follows_fairseq_rule():
    # 2 utterances of 16000 and 9000 samples: 49 frames, chunks of 16000 // 49 = 326 samples
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9000:] = True
    frames = HubertBase.frame_padding_mask(pad, 49)
    first_padded = -(-9000 // 326)  # chunks entirely past sample 9000
    assert frames[0].sum() == 0
    assert frames[1].tolist() == [False] * first_padded + [True] * (49 - first_padded)


def _expected_masked(lengths: list[int], frames: int, p: float, span: int) -> float:
    """E[#masked frames]: frame t is masked unless none of the n_t starts that cover it fires."""
    total = 0.0
    for n in lengths:
        last_start = max(n - span, 0)
        for t in range(n):
            covering = min(t, last_start) - max(0, t - span + 1) + 1
            total += 1 - (1 - p) ** max(covering, 0)
    return total


@pytest.mark.parametrize("p,span", [(0.08, 10), (0.3, 4)])
def test_mask_statistics_match_generative_process(p, span):
    torch.manual_seed(0)
    model = HubertBase(tiny(), mask_prob=p, mask_length=span)
    lengths, frames, draws = [124, 124, 90, 37, 8, 3], 124, 400
    padding = torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]
    totals = []
    for _ in range(draws):
        mask = model.sample_mask(len(lengths), frames, padding, torch.device("cpu"))
        assert not (mask & padding).any(), "a padded frame was masked"
        totals.append(mask.sum().item())
    totals_t = torch.tensor(totals, dtype=torch.float64)
    expected = _expected_masked(lengths, frames, p, span)
    stderr = totals_t.std().item() / math.sqrt(draws)
    assert abs(totals_t.mean().item() - expected) < 5 * stderr + 0.01 * expected
    # fairseq's mask_prob counts spans per frame/span: p * span * T / span = p * T starts per utterance
    assert model.mask_prob * span == pytest.approx(p * span)


def test_masked_runs_are_whole_spans():
    torch.manual_seed(1)
    model = HubertBase(tiny(), mask_prob=0.01, mask_length=10)
    mask = model.sample_mask(200, 124, None, torch.device("cpu"))
    for row in mask.int().tolist():
        runs = "".join(map(str, row)).split("0")
        assert all(len(run) >= 10 for run in runs if run)
    assert mask.any()


def test_target_length_mismatch_and_bad_ids_are_clear_errors():
    model = HubertBase(tiny())
    wav = torch.randn(2, 16000)
    with pytest.raises(ValueError, match=r"num_frames=49.*expected \(2, 49\)"):
        model.pretraining_step(wav, None, torch.full((2, 50), 5))
    with pytest.raises(ValueError, match=r"target_ids must be in \[0, 104\)"):
        model.pretraining_step(wav, None, torch.full((2, 49), 104))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        HubertBase(tiny(num_attention_heads=5))


def test_loss_and_metrics_follow_fairseq_criterion():
    torch.manual_seed(0)
    model = HubertBase(tiny(**NO_DROPOUT))
    wav = real_batch(2, 16000)
    targets = energy_targets(wav)
    targets[0, :5] = -100  # ignored frames count nowhere
    out = model.pretraining_step(wav, None, targets, unmasked_weight=0.0, feature_pen_weight=10.0)
    m = out.metrics
    assert set(m) == {"loss", "masked_loss", "masked_accuracy", "unmasked_accuracy", "perplexity",
                      "feature_penalty", "num_masked", "num_unmasked"}
    assert m["num_masked"] + m["num_unmasked"] == targets.numel() - 5
    assert m["loss"] == pytest.approx(m["masked_loss"] + 10 * m["feature_penalty"], rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["masked_loss"]), rel=1e-6)
    assert 0 <= m["masked_accuracy"] <= 1 and 0 <= m["unmasked_accuracy"] <= 1
    torch.manual_seed(0)
    both = model.pretraining_step(wav, None, targets, unmasked_weight=1.0, feature_pen_weight=0.0).metrics
    assert both["loss"] > both["masked_loss"]  # unmasked CE adds, still per masked frame


def test_training_step_lowers_loss_on_real_audio():
    torch.manual_seed(0)
    model = HubertBase(tiny(**NO_DROPOUT))
    wav = real_batch(4)
    targets = energy_targets(wav)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss_with_fixed_mask() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return model.pretraining_step(wav, None, targets).loss.item()

    before = loss_with_fixed_mask()
    torch.manual_seed(123)
    out = model.pretraining_step(wav, None, targets)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert out.loss.item() == pytest.approx(before, rel=1e-5)
    assert loss_with_fixed_mask() < before - 1e-3


def _grads(model: HubertBase, wav, targets, padding) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    model.pretraining_step(wav, padding, targets, unmasked_weight=0.5).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = HubertBase(tiny(layerdrop=0.0))  # dropout on: checkpoint replays the same RNG state
    wav = real_batch(2, 16000)
    padding = torch.zeros_like(wav, dtype=torch.bool)
    padding[1, 11000:] = True
    targets = energy_targets(wav)
    calls = []
    model.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = _grads(model, wav, targets, padding)
    assert len(calls) == 1
    model.gradient_checkpointing = True
    ckpt = _grads(model, wav, targets, padding)
    assert len(calls) == 3, "checkpointed layers run again in backward"
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_feature_grad_mult_scales_cnn_gradient_only():
    torch.manual_seed(0)
    model = HubertBase(tiny(**NO_DROPOUT, feature_grad_mult=1.0))
    wav = real_batch(2, 16000)
    targets = energy_targets(wav)
    full = _grads(model, wav, targets, None)
    model.cfg.feature_grad_mult = 0.1
    scaled = _grads(model, wav, targets, None)
    for name in full:
        factor = 0.1 if name.startswith("feature_extractor.") else 1.0
        expected = full[name] * factor
        assert (scaled[name] - expected).abs().max() <= 1e-5 * expected.abs().max(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_is_finite(dtype):
    torch.manual_seed(0)
    model = HubertBase(tiny())
    wav = real_batch(2, 16000)
    with torch.autocast("cpu", dtype=dtype):
        out = model.pretraining_step(wav, None, energy_targets(wav), unmasked_weight=0.5)
        hidden, _ = model.extract_hidden_states(wav)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert hidden[-1].dtype == dtype and torch.isfinite(hidden[-1].float()).all()
