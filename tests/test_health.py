"""HealthMeter: the streamed health figures equal the figures computed on all the audio at once, and its
memory stays bounded."""
from __future__ import annotations

import numpy as np
import torch

from fedhubert import health
from fedhubert.data import Batch
from fedhubert.model import HubertBase
from fedhubert.probes import effective_rank, mean_cosine_similarity
from tests.test_model import real_batch, tiny


def batch_of(wav: torch.Tensor, lengths: list[int]) -> Batch:
    padding = torch.arange(wav.shape[1])[None, :] >= torch.tensor(lengths)[:, None]
    wav = wav.masked_fill(padding, 0.0)
    return Batch(wav, padding, torch.zeros(len(wav), 1, dtype=torch.long), lengths, list(range(len(wav))),
                 [0] * len(wav))


def all_at_once(model: HubertBase, batches: list[Batch]) -> dict[str, float]:
    """The figures from every frame and every chunk, kept in memory: what the meter must reproduce."""
    frames = {w: [] for w in health.WHERE}
    chunks = {w: [] for w in health.WHERE}
    with torch.no_grad():
        for batch in batches:
            hidden, padding = model.extract_hidden_states(batch.waveforms, batch.padding_mask)
            lengths = (~padding).sum(1).tolist()
            for where, index in health.health_layers(model.cfg.num_hidden_layers).items():
                for b, length in enumerate(lengths):
                    x = hidden[index][b, :length].numpy()
                    frames[where].append(x)
                    chunks[where] += [c.mean(0) for c in np.array_split(x, max(1, round(length / health.CHUNK_FRAMES)))]
    out = {}
    for where in health.WHERE:
        out[f"health_rank_{where}"] = effective_rank(np.concatenate(frames[where]))
        out[f"health_cos_{where}"] = mean_cosine_similarity(np.stack(chunks[where]))
    return out


def test_streamed_health_equals_the_figures_on_all_the_audio():
    torch.manual_seed(0)
    model = HubertBase(tiny(num_hidden_layers=3)).train()  # the meter must switch to eval and back
    wav = real_batch(n=8, samples=24000)
    batches = [batch_of(wav[:4], [24000, 20000, 16000, 24000]), batch_of(wav[4:], [24000, 12000, 24000, 8000])]
    meter = health.HealthMeter(model, seed=0)
    for batch in batches:
        meter.update(batch)
    assert model.training
    model.eval()
    expected, got = all_at_once(model, batches), meter.result()
    assert set(got) == set(expected)
    for key in expected:
        assert abs(got[key] - expected[key]) < 1e-6 * max(1.0, abs(expected[key])), (key, got[key], expected[key])


def test_health_meter_keeps_a_bounded_uniform_sample(monkeypatch):
    monkeypatch.setattr(health, "MAX_FRAMES", 50)
    torch.manual_seed(0)
    model = HubertBase(tiny())
    meter = health.HealthMeter(model, seed=0)
    wav = real_batch(n=4, samples=24000)
    for _ in range(3):  # 3 x 4 x 74 frames seen
        meter.update(batch_of(wav, [24000] * 4))
    with torch.no_grad():
        hidden, _ = model.eval().extract_hidden_states(wav, None)
    for where, index in health.health_layers(model.cfg.num_hidden_layers).items():
        keys, frames = meter.sample[where]
        assert frames.shape[0] == 50 and np.all(np.diff(keys) >= 0)  # the 50 smallest keys, in order
        seen = hidden[index].reshape(-1, hidden[index].shape[-1]).numpy()
        assert all(np.abs(seen - row).max(1).min() < 1e-5 for row in frames)  # real frames, not mixtures
    assert meter.chunks == 3 * 4 * 3  # 74 frames -> 3 chunks of 0.5 s per crop
    assert 0 < meter.result()["health_rank_first"] <= 50
