"""Evaluation: what a model learned, measured the way a downstream user would see it.

Every pretrained model is loaded through s3prl's ``hubert_local`` upstream (after our compat import),
exactly as ``run_downstream.py -u hubert_local -k CKPT`` loads it, and probed on speech it never
trained on (see eval_sets.py):

1. speaker identification: mean-pooled features of each layer and a learned weighted sum of layers ->
   a linear classifier, trained on half of each speaker's held-out utterances, tested on the other half;
2. speaker verification without training: cosine scores of mean-pooled embeddings, equal error rate;
3. content across voices: keyword classification, tested on espeak-ng voices it never trained on;
4. masked prediction on each client's validation split with that client's own head (our model code:
   s3prl's upstream has no prediction head);
5. representation health: effective rank of frame features and mean pairwise cosine of utterance
   embeddings, per layer (a collapsed encoder has a low rank and a cosine near 1).

The rows (federated, centralized, student, random-init, mfcc) are described in evaluation_rows.py;
the table and files are written by report.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhubert.config import Config, num_frames
from fedhubert.errors import DataError
from fedhubert.eval_sets import ProbeSet
from fedhubert.probes import effective_rank, layerwise_probe, mean_cosine_similarity, verification_eer

log = logging.getLogger(__name__)
FRAME_SAMPLE = 4000  # frames per layer for the effective rank (an SVD of at most 4000 x D)
BATCH = 16           # clips per upstream call (sorted by length, so padding stays small)


def best_checkpoint(cfg: Config, student: bool = False) -> Path:
    """The best global model of the config's pretraining, or with ``student`` its distilled student."""
    if student:
        path = Path(cfg.distillation.checkpoint_dir) / "server" / "best_student_model.pt"
        script = "run_distillation.sh"
    else:
        path = Path(cfg.federation.checkpoint_dir) / "server" / "best_global_model.pt"
        script = "run_pretraining.sh"
    if not path.is_file():
        raise DataError(f"{path} not found: run {script} with the same config first")
    return path


def s3prl_upstream(checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """s3prl's ``hubert_local`` upstream of ``checkpoint``, in eval mode. s3prl's own torch.load relies on
    torch's default (weights_only, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set): the file is first read
    with our safe loader, which refuses one holding pickled objects (DataError naming it)."""
    from fedhubert.checkpoint import read_checkpoint

    read_checkpoint(checkpoint, mmap=True)
    import fedhubert.compat  # noqa: F401  (must precede s3prl on torchaudio >= 2.9)
    import s3prl.hub

    return s3prl.hub.hubert_local(ckpt=str(checkpoint)).to(device).eval()


def s3prl_hidden_states(checkpoint: str | Path, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states (CNN projection + every transformer layer) from s3prl's ``hubert_local``."""
    with torch.no_grad():
        return list(s3prl_upstream(checkpoint)(waveforms)["hidden_states"])


def check_s3prl_load(cfg: Config, checkpoint: str | Path | None = None) -> int:
    """Loads ``checkpoint`` (default: the best global model) with s3prl and runs the first validation
    utterance of client 0 through it; returns the number of hidden states (num_hidden_layers + 1) after
    checking that it matches the checkpoint's depth."""
    from fedhubert.audio import load_audio
    from fedhubert.checkpoint import load_checkpoint
    from fedhubert.data import read_manifest

    ckpt = Path(checkpoint) if checkpoint is not None else best_checkpoint(cfg)
    expected = load_checkpoint(ckpt)[1].model.num_hidden_layers + 1  # also: a clear error for a bad file
    root, paths, _ = read_manifest(Path(cfg.data.partitions_dir) / "client_0" / "valid.tsv")
    wav = load_audio(root / paths[0], cfg.data.sample_rate)
    hidden = s3prl_hidden_states(ckpt, [wav])
    if len(hidden) != expected:
        raise DataError(f"{ckpt}: s3prl returned {len(hidden)} hidden states, expected {expected}")
    log.info("s3prl hubert_local loaded %s: %d hidden states of shape %s", ckpt, len(hidden),
             tuple(hidden[-1].shape))
    return len(hidden)


# --- features ------------------------------------------------------------------------------------------

@dataclass
class Features:
    """Clip-level embeddings [layers, clips, dim] and, per layer, a sample of frame features."""
    pooled: np.ndarray
    frames: list[np.ndarray]


@torch.no_grad()
def upstream_features(upstream: torch.nn.Module, clips: ProbeSet, seed: int,
                      device: torch.device | str = "cpu") -> Features:
    """Mean-pooled hidden states of every clip (padding frames excluded), and up to FRAME_SAMPLE
    random frames per layer for the effective rank."""
    order = sorted(range(len(clips)), key=lambda i: len(clips.waveforms[i]))
    pooled: list[np.ndarray | None] = [None] * len(clips)
    frames: list[list[np.ndarray]] = []
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        hidden = upstream([clips.waveforms[i].to(device) for i in idx])["hidden_states"]
        if not frames:
            frames = [[] for _ in hidden]
        for b, i in enumerate(idx):
            t = num_frames(len(clips.waveforms[i]))
            per_layer = [h[b, :t].float().cpu().numpy() for h in hidden]
            pooled[i] = np.stack([f.mean(0) for f in per_layer])
            for layer, f in enumerate(per_layer):
                frames[layer].append(f)
    rng = np.random.default_rng(seed)
    sampled = []
    for layer_frames in frames:
        stacked = np.concatenate(layer_frames)
        pick = rng.choice(len(stacked), size=min(FRAME_SAMPLE, len(stacked)), replace=False)
        sampled.append(stacked[np.sort(pick)])
    return Features(np.stack(pooled, axis=1), sampled)


def mfcc_features(cfg: Config, clips: ProbeSet) -> Features:
    """The floor every model must beat: mean and standard deviation of the 39-d MFCC (one 'layer')."""
    from fedhubert.features import MfccFeatures, single_torch_thread

    mfcc = MfccFeatures(cfg)
    with single_torch_thread():
        per_clip = [mfcc(w) for w in clips.waveforms]
    pooled = np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in per_clip])[None]
    return Features(pooled, [np.concatenate(per_clip)[:FRAME_SAMPLE]])


# --- probes --------------------------------------------------------------------------------------------

def _split(features: np.ndarray, clips: ProbeSet) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    test = np.asarray(clips.is_test)
    labels = np.asarray(clips.labels)
    return features[:, ~test], labels[~test], features[:, test], labels[test]


def classification(features: Features, clips: ProbeSet, seed: int) -> dict[str, Any]:
    """Linear probe of every layer and of the learned weighted sum of layers."""
    result = layerwise_probe(*_split(features.pooled, clips), seed=seed)
    return {"best_layer": result.best_layer, "best_accuracy": result.best_accuracy,
            "weighted_accuracy": result.weighted_accuracy, "per_layer": result.per_layer,
            "layer_weights": result.layer_weights, "chance": _majority_share(clips)}


def _majority_share(clips: ProbeSet) -> float:
    test = [lab for lab, t in zip(clips.labels, clips.is_test) if t]
    return max(test.count(lab) for lab in set(test)) / len(test)


def verification(features: Features, clips: ProbeSet) -> dict[str, Any]:
    """EER of cosine scores between every pair of segments, per layer. Embeddings are centred on their
    mean over all segments first (label-free, like any cosine back-end's mean normalisation)."""
    speakers = np.asarray(clips.labels)
    eers = [verification_eer(layer - layer.mean(0), speakers) for layer in features.pooled]
    best = int(np.argmin(eers))
    return {"best_layer": best, "eer": eers[best], "per_layer": eers}


def health(features: Features) -> dict[str, Any]:
    """Effective rank of frame features and mean pairwise cosine of clip embeddings, per layer."""
    ranks = [effective_rank(f) for f in features.frames]
    cosines = [mean_cosine_similarity(layer) for layer in features.pooled]
    return {"effective_rank": ranks, "mean_cosine": cosines,
            "min_effective_rank": min(ranks), "max_mean_cosine": max(cosines)}


def probe_row(features: dict[str, Features], sets: dict[str, ProbeSet], seed: int) -> dict[str, Any]:
    """Every clip-level probe of one row."""
    return {"speaker_id": classification(features["speaker"], sets["speaker"], seed),
            "speaker_verification": verification(features["speaker"], sets["speaker"]),
            "keyword": classification(features["keyword"], sets["keyword"], seed),
            "health": health(features["speaker"])}


def row_features(checkpoint: Path | None, cfg: Config, sets: dict[str, ProbeSet],
                 device: torch.device) -> dict[str, Features]:
    """Features of every probe set: through s3prl for a checkpoint, MFCC statistics for None."""
    if checkpoint is None:
        return {name: mfcc_features(cfg, clips) for name, clips in sets.items()}
    upstream = s3prl_upstream(checkpoint, device)
    return {name: upstream_features(upstream, clips, cfg.seed, device) for name, clips in sets.items()}
