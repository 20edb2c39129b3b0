"""Evaluation of trained checkpoints. For now: load one through s3prl's ``hubert_local`` upstream,
exactly as ``run_downstream.py -u hubert_local -k CKPT`` does, and run real speech through it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedhubert.config import Config
from fedhubert.errors import DataError

log = logging.getLogger(__name__)


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


def s3prl_hidden_states(checkpoint: str | Path, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states (CNN projection + every transformer layer) from s3prl's ``hubert_local``."""
    import fedhubert.compat  # noqa: F401  (must precede s3prl on torchaudio >= 2.9)
    import s3prl.hub

    upstream = s3prl.hub.hubert_local(ckpt=str(checkpoint)).eval()
    with torch.no_grad():
        return list(upstream(waveforms)["hidden_states"])


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
