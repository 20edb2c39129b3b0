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
from fedhubert.data import Batch
from fedhubert.probes import effective_rank

CHUNK_FRAMES = 25     # 0.5 s at 50 Hz: the unit whose embeddings are compared (2 per 1 s crop)
MAX_FRAMES = 4000     # frames per layer for the SVD
WHERE = ("first", "mid", "last")


def health_layers(num_layers: int) -> dict[str, int]:
    """hidden_states index of the first, middle and last transformer layer's output."""
    return {"first": 1, "mid": max(1, (num_layers + 1) // 2), "last": num_layers}


class HealthMeter:
    """Collects the health figures of ``encoder`` (a HubertBase) batch by batch, during the validation
    pass itself (``evaluate_local(..., observe=meter.update)``), so the audio is decoded once. Memory
    stays bounded: a uniform random sample of MAX_FRAMES frames per layer (the smallest random keys
    seen so far) for the effective rank, and a running sum of unit chunk embeddings for the cosine
    (the mean pairwise cosine of n unit vectors u_i is (|sum u_i|^2 - sum |u_i|^2) / (n (n - 1)))."""

    def __init__(self, encoder: torch.nn.Module, seed: int) -> None:
        self.encoder, self.rng = encoder, np.random.default_rng(seed)
        self.layers = health_layers(encoder.cfg.num_hidden_layers)
        self.sample: dict[str, tuple[np.ndarray, np.ndarray] | None] = {w: None for w in WHERE}  # (keys, frames)
        self.unit_sum: dict[str, np.ndarray | float] = {w: 0.0 for w in WHERE}
        self.unit_sq: dict[str, float] = {w: 0.0 for w in WHERE}  # sum of |u_i|^2: 1 per chunk, 0 if all-zero
        self.chunks = 0

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        was_training = self.encoder.training
        self.encoder.eval()  # no dropout, no layerdrop, no masking: what a downstream user extracts
        hidden, padding = self.encoder.extract_hidden_states(batch.waveforms, batch.padding_mask)
        self.encoder.train(was_training)
        lengths = [hidden[0].shape[1]] * len(batch) if padding is None else (~padding).sum(1).tolist()
        for where, index in self.layers.items():
            per_item = [hidden[index][b, :length].float().cpu().numpy() for b, length in enumerate(lengths)]
            self._keep(where, np.concatenate(per_item))
            units = np.stack([c.mean(0) for x in per_item
                              for c in np.array_split(x, max(1, round(len(x) / CHUNK_FRAMES)))]).astype(np.float64)
            norms = np.linalg.norm(units, axis=1, keepdims=True)
            unit = np.divide(units, norms, out=np.zeros_like(units), where=norms > 0)
            self.unit_sum[where] = self.unit_sum[where] + unit.sum(0)
            self.unit_sq[where] += float(np.sum(unit * unit))
        self.chunks += len(units)  # the same chunks at every layer

    def _keep(self, where: str, frames: np.ndarray) -> None:
        keys = self.rng.random(len(frames))
        if self.sample[where] is not None:
            keys, frames = np.concatenate([self.sample[where][0], keys]), np.concatenate([self.sample[where][1], frames])
        keep = np.argsort(keys)[:MAX_FRAMES]
        self.sample[where] = (keys[keep], frames[keep])

    def result(self) -> dict[str, float]:
        """``health_rank_<where>`` and ``health_cos_<where>`` for the first, middle and last layer."""
        out, n = {}, self.chunks
        for where in WHERE:
            out[f"health_rank_{where}"] = effective_rank(self.sample[where][1]) if self.sample[where] is not None else 0.0
            total = np.asarray(self.unit_sum[where])
            out[f"health_cos_{where}"] = float((total @ total - self.unit_sq[where]) / (n * (n - 1))) if n > 1 else 0.0
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
