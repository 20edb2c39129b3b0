"""Evaluation of trained checkpoints. For now: load one through s3prl's ``hubert_local`` upstream,
exactly as ``run_downstream.py -u hubert_local -k CKPT`` does, and run real speech through it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedhubert.config import Config
from fedhubert.errors import DataError

log = logging.getLogger(__name__)


def best_checkpoint(cfg: Config) -> Path:
    path = Path(cfg.federation.checkpoint_dir) / "server" / "best_global_model.pt"
    if not path.is_file():
        raise DataError(f"{path} not found: run run_pretraining.sh with the same config first")
    return path


def s3prl_hidden_states(checkpoint: str | Path, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states (CNN projection + every transformer layer) from s3prl's ``hubert_local``."""
    import fedhubert.compat  # noqa: F401  (must precede s3prl on torchaudio >= 2.9)
    import s3prl.hub

    upstream = s3prl.hub.hubert_local(ckpt=str(checkpoint)).eval()
    with torch.no_grad():
        return list(upstream(waveforms)["hidden_states"])


def check_s3prl_load(cfg: Config) -> int:
    """Loads the best global model with s3prl and runs the first validation utterance of client 0
    through it; returns the number of hidden states (num_hidden_layers + 1)."""
    from fedhubert.audio import load_audio
    from fedhubert.data import read_manifest

    ckpt = best_checkpoint(cfg)
    root, paths, _ = read_manifest(Path(cfg.data.partitions_dir) / "client_0" / "valid.tsv")
    wav = load_audio(root / paths[0], cfg.data.sample_rate)
    hidden = s3prl_hidden_states(ckpt, [wav])
    expected = cfg.model.num_hidden_layers + 1
    if len(hidden) != expected:
        raise DataError(f"{ckpt}: s3prl returned {len(hidden)} hidden states, expected {expected}")
    log.info("s3prl hubert_local loaded %s: %d hidden states of shape %s", ckpt, len(hidden),
             tuple(hidden[-1].shape))
    return len(hidden)
