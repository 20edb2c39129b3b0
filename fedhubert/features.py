"""The frame features HuBERT's k-means clusters, one vector per model frame (50 Hz: the CNN's receptive
field of 400 samples and stride of 320, no padding). The first iteration clusters MFCC (+ deltas)
frames (``kmeans.features: mfcc``, :class:`MfccFeatures`); the next ones a transformer layer's output
of the previous iteration's model (``hubert``, :class:`HubertFeatures`). :func:`make_features` is the
one place that picks them, for the local and the federated k-means and the centralized baseline."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torchaudio

from fedhubert.config import FRAME_LENGTH, FRAME_STRIDE, Config, num_frames
from fedhubert.errors import ConfigError, DataError
from fedhubert.fileio import file_sha1

log = logging.getLogger(__name__)
# Utterances longer than this go through the model in pieces (fairseq's dump_hubert_feature.py: 1,600,000
# samples = 100 s); LibriSpeech's longest is ~35 s, so in practice every utterance is one forward pass.
MAX_CHUNK_FRAMES = 5000


class MfccFeatures:
    """Waveform ``[L]`` -> float32 features ``[num_frames(L), n_mfcc * (3 if deltas else 1)]``."""

    iteration = 1  # MFCC targets are HuBERT's first iteration

    def __init__(self, cfg: Config):
        k = cfg.kmeans
        if k.n_mfcc > k.n_mels:
            raise ConfigError(f"kmeans.n_mfcc ({k.n_mfcc}) must not exceed kmeans.n_mels ({k.n_mels})")
        # Window and hop equal the model's CNN receptive field and stride, and center=False adds no
        # padding, so MFCC frame i covers exactly the samples of model frame i.
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=cfg.data.sample_rate, n_mfcc=k.n_mfcc,
            melkwargs={"n_fft": FRAME_LENGTH, "n_mels": k.n_mels, "hop_length": FRAME_STRIDE,
                       "win_length": FRAME_LENGTH, "center": False})
        self.use_deltas = k.use_deltas
        self.dim = k.n_mfcc * (3 if k.use_deltas else 1)

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor) -> np.ndarray:
        feats = self.mfcc(wav)  # [n_mfcc, T]
        if self.use_deltas:
            delta = torchaudio.functional.compute_deltas(feats)
            feats = torch.cat([feats, delta, torchaudio.functional.compute_deltas(delta)])
        return feats.T.contiguous().numpy()

    def record(self) -> dict[str, Any]:
        """This front end's part of targets.json."""
        return {"iteration": self.iteration, "features": "mfcc", "feature_dim": self.dim}


def default_layer(num_layers: int) -> int:
    """kmeans.layer 0: the middle transformer layer, ceil(L / 2) (layer 6 of HuBERT Base's 12, the
    paper's choice for the second iteration)."""
    return math.ceil(num_layers / 2)


@functools.lru_cache(maxsize=2)
def _feature_model(path: str, stamp: tuple[int, int], layer: int, device: str) -> tuple[torch.nn.Module, Config, int, str]:
    """(the model cut after transformer layer ``layer``, in eval mode on ``device``; its config; the
    iteration of the targets it was trained on; the file's SHA-1), read once per process while the
    file's (mtime, size) stamp is unchanged (the federated k-means builds features for every message)."""
    from fedhubert.checkpoint import load_checkpoint

    try:
        model, model_cfg, extras = load_checkpoint(path)
    except DataError as exc:
        raise DataError(f"kmeans.checkpoint: {exc}") from None
    depth = model_cfg.model.num_hidden_layers
    if not 1 <= (layer or default_layer(depth)) <= depth:
        raise ConfigError(f"kmeans.layer is {layer} but {path} has {depth} transformer layers: use 1..{depth} "
                          f"(0 = ceil({depth} / 2) = {default_layer(depth)})")
    layer = layer or default_layer(depth)
    if layer < depth:  # the layers above are never needed: drop them (hidden[layer] is unchanged)
        model.encoder.layers = model.encoder.layers[:layer]
        if model.encoder.layer_norm_first:  # pre-norm: the final LayerNorm follows the last layer only
            model.encoder.layer_norm = torch.nn.Identity()
    targets = extras.get("targets")
    trained_on = targets.get("iteration") if isinstance(targets, dict) else None
    # a checkpoint that records no targets (older runs, released models) was trained on MFCC targets
    iteration = trained_on if isinstance(trained_on, int) and trained_on >= 1 else 1
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device), model_cfg, iteration, file_sha1(path)


class HubertFeatures:
    """Waveform ``[L]`` -> float32 ``[num_frames(L), hidden_size]``: the output of transformer layer
    ``kmeans.layer`` (1-based; 0 = :func:`default_layer`) of the model in ``kmeans.checkpoint``, in eval
    mode and without masking, i.e. ``model.extract_hidden_states(wav)[layer]``. The model's frames are
    exactly ``num_frames(L)`` (its CNN: receptive field 400, stride 320, no padding); an utterance of
    more than :data:`MAX_CHUNK_FRAMES` frames goes through in pieces cut at frame boundaries."""

    def __init__(self, cfg: Config, chunk_frames: int = MAX_CHUNK_FRAMES):
        from fedhubert.train import resolve_device

        path = Path(cfg.kmeans.checkpoint)
        if not path.is_file():
            raise DataError(f"kmeans.checkpoint not found: {path} (the model whose features are clustered: "
                            "run ./run_pretraining.sh first, or fix the path)")
        self.device = resolve_device(cfg.training.device)
        stat = path.stat()
        self.model, model_cfg, trained_on, self.sha1 = _feature_model(
            str(path.resolve()), (stat.st_mtime_ns, stat.st_size), cfg.kmeans.layer, str(self.device))
        if model_cfg.data.sample_rate != cfg.data.sample_rate:
            raise ConfigError(f"data.sample_rate is {cfg.data.sample_rate} but the model in {path} (kmeans.checkpoint) "
                              f"was trained at {model_cfg.data.sample_rate} Hz")
        self.path, self.num_layers = path.resolve(), model_cfg.model.num_hidden_layers
        self.layer = cfg.kmeans.layer or default_layer(self.num_layers)
        self.dim, self.iteration, self.chunk_frames = model_cfg.model.hidden_size, trained_on + 1, chunk_frames

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor) -> np.ndarray:
        total = num_frames(wav.shape[0])
        if total == 0:
            return np.zeros((0, self.dim), np.float32)
        pieces = []  # piece p: frames [f0, f1) = samples [320 f0, 320 (f1 - 1) + 400), the last one to the end
        for f0 in range(0, total, self.chunk_frames):
            f1 = min(f0 + self.chunk_frames, total)
            end = wav.shape[0] if f1 == total else (f1 - 1) * FRAME_STRIDE + FRAME_LENGTH
            pieces.append((f0, f1, wav[f0 * FRAME_STRIDE:end]))  # one piece: the whole utterance, as in training
        out = []
        for f0, f1, piece in pieces:
            hidden, _ = self.model.extract_hidden_states(piece[None].to(self.device, torch.float32))
            feats = hidden[self.layer][0]
            if feats.shape[0] != f1 - f0:  # cannot happen with the CNN's arithmetic; never pad or trim silently
                raise DataError(f"{self.path}: {feats.shape[0]} frames for {piece.shape[0]} samples, expected "
                                f"num_frames = {f1 - f0}")
            out.append(feats.float().cpu())
        return torch.cat(out).numpy()

    def record(self) -> dict[str, Any]:
        """This front end's part of targets.json."""
        return {"iteration": self.iteration, "features": "hubert", "checkpoint": str(self.path),
                "checkpoint_sha1": self.sha1, "layer": self.layer, "num_layers": self.num_layers,
                "feature_dim": self.dim}


def make_features(cfg: Config) -> MfccFeatures | HubertFeatures:
    """The feature front end ``kmeans.features`` selects: the one factory of the local and the federated
    k-means. With hubert, a missing checkpoint or a layer beyond its depth is a one-line error here,
    before anything is fitted or written."""
    return HubertFeatures(cfg) if cfg.kmeans.features == "hubert" else MfccFeatures(cfg)


class FeatureCache:
    """The frame features of one split, computed once and read back per utterance: a client's k-means
    uses each training utterance kmeans.fit_passes + 1 times (fitting, then labelling), and decoding
    plus MFCC costs ~300x more than reading the frames back (benchmarks/bench_data.py, feature_cache).
    A hidden temporary file in ``folder`` (39 float32 per 20 ms frame: 28 MB per hour of audio), deleted
    when the ``with`` block ends, whether it succeeded or not."""

    def __init__(self, folder: Path, dim: int):
        fd, name = tempfile.mkstemp(prefix=".features.", suffix=".tmp", dir=folder)
        self.path, self.dim, self.offsets = Path(name), dim, [0]
        self._writer, self._frames = os.fdopen(fd, "wb"), None

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()
        self._frames = None
        self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def append(self, feats: np.ndarray) -> None:
        """Adds the next utterance's ``[frames, dim]`` features (only before the first read)."""
        self._writer.write(np.ascontiguousarray(feats, dtype=np.float32).tobytes())
        self.offsets.append(self.offsets[-1] + len(feats))

    def __getitem__(self, i: int) -> np.ndarray:
        if self._frames is None:  # the first read: every utterance is in
            self._writer.close()
            total = self.offsets[-1]
            self._frames = (np.memmap(self.path, np.float32, "r", shape=(total, self.dim)) if total
                            else np.zeros((0, self.dim), np.float32))
        return np.array(self._frames[self.offsets[i]:self.offsets[i + 1]])


@contextlib.contextmanager
def feature_threads(features: MfccFeatures | HubertFeatures) -> Iterator[None]:
    """MFCC on one torch thread (see :func:`single_torch_thread`); a model's forward keeps torch's
    threads (its matrix products are large enough to gain from them)."""
    with single_torch_thread() if isinstance(features, MfccFeatures) else contextlib.nullcontext():
        yield



@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Runs torch ops on one thread: per-utterance MFCC tensors are small, so intra-op threads only
    add synchronisation, and on shared cores they stall (40x slower measured on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
