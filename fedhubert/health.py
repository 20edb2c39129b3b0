"""Representation health: cheap figures that see an encoder collapse the validation loss cannot see
(the client-local heads keep fitting while the shared encoder maps everything to nearly one point).

Each client computes, on its validation audio and at the first, middle and last transformer layer of
the global encoder: the effective rank of the frame features (exp of the entropy of their normalised
singular values) and the mean pairwise cosine similarity of mean-pooled 0.5 s chunks. The server compares
every round with round 0 (the seeded initial model): a rank that falls below
``federation.collapse_rank_ratio`` of round 0's, or a cosine above ``federation.collapse_max_cosine``,
marks the round as collapsed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedhubert.config import Config
from fedhubert.probes import effective_rank, mean_cosine_similarity

CHUNK_FRAMES = 25     # 0.5 s at 50 Hz: the unit whose embeddings are compared (2 per 1 s crop)
MAX_FRAMES = 4000     # frames per layer for the SVD
WHERE = ("first", "mid", "last")


def health_layers(num_layers: int) -> dict[str, int]:
    """hidden_states index of the first, middle and last transformer layer's output."""
    return {"first": 1, "mid": max(1, (num_layers + 1) // 2), "last": num_layers}


@torch.no_grad()
def representation_health(encoder: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                          seed: int) -> dict[str, float]:
    """``health_rank_<where>`` and ``health_cos_<where>`` of ``encoder`` (a HubertBase) on ``loader``'s
    audio, in eval mode; the model's training mode is restored."""
    was_training = encoder.training
    encoder.to(device).eval()
    layers = health_layers(encoder.cfg.num_hidden_layers)
    frames: dict[str, list[np.ndarray]] = {w: [] for w in WHERE}
    chunks: dict[str, list[np.ndarray]] = {w: [] for w in WHERE}
    for batch in loader:
        batch = batch.to(device)
        hidden, padding = encoder.extract_hidden_states(batch.waveforms, batch.padding_mask)
        lengths = [hidden[0].shape[1]] * len(batch) if padding is None else (~padding).sum(1).tolist()
        for where, index in layers.items():
            for b, length in enumerate(lengths):
                x = hidden[index][b, :length].float().cpu().numpy()
                frames[where].append(x)
                chunks[where] += [c.mean(0) for c in np.array_split(x, max(1, round(length / CHUNK_FRAMES)))]
    encoder.train(was_training)
    rng = np.random.default_rng(seed)
    out = {}
    for where in WHERE:
        stacked = np.concatenate(frames[where])
        pick = np.sort(rng.choice(len(stacked), size=min(MAX_FRAMES, len(stacked)), replace=False))
        out[f"health_rank_{where}"] = effective_rank(stacked[pick])
        out[f"health_cos_{where}"] = mean_cosine_similarity(np.stack(chunks[where])) if len(chunks[where]) > 1 else 0.0
    return out


def collapse_reasons(val: dict[str, Any], baseline: dict[str, Any], cfg: Config) -> list[str]:
    """Why the round whose validation metrics are ``val`` looks collapsed against round 0's ``baseline``
    (empty: healthy, or no health figures to judge)."""
    f, reasons = cfg.federation, []
    for where in WHERE:
        rank, rank0 = val.get(f"health_rank_{where}"), baseline.get(f"health_rank_{where}")
        if rank is not None and rank0 and f.collapse_rank_ratio > 0 and rank < f.collapse_rank_ratio * rank0:
            reasons.append(f"effective rank of the {where} layer {rank:.1f} is {rank / rank0:.0%} of round 0's "
                           f"{rank0:.1f} (federation.collapse_rank_ratio {f.collapse_rank_ratio})")
        cos = val.get(f"health_cos_{where}")
        if cos is not None and cos > f.collapse_max_cosine:
            reasons.append(f"mean cosine of the {where} layer's 0.5 s embeddings {cos:.5f} > "
                           f"federation.collapse_max_cosine {f.collapse_max_cosine}")
    return reasons
