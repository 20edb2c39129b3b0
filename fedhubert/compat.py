"""Makes s3prl 0.4.18 run on torchaudio >= 2.9. Import this module before anything imports s3prl.

torchaudio 2.9 removed ``set_audio_backend`` and ``sox_effects`` and moved ``load``/``save`` onto
torchcodec (not installed); ``info`` is gone. s3prl calls all of them (``s3prl.hub`` fails at import on
``set_audio_backend``). This module puts back:

- ``torchaudio.set_audio_backend`` / ``get_audio_backend``: no-ops (soundfile is the only backend);
- ``torchaudio.load`` / ``save`` / ``info``: through soundfile, with the old return types;
- ``torchaudio.sox_effects.apply_effects_tensor`` / ``apply_effects_file`` for the effects s3prl's recipes
  use that have an exact meaning without libsox: channels, rate (torchaudio.functional.resample, not
  sox's resampler), gain, norm, pad, trim, reverse. Others (vad, silence, ...) raise NotImplementedError.

Importing it twice is harmless. It only fills in what is missing, and replaces load/save only on
torchaudio >= 2.9, whose torchcodec versions cannot work here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF

SUPPORTED_EFFECTS = ("channels", "rate", "gain", "norm", "pad", "trim", "reverse")


@dataclass
class AudioMetaData:
    """What the old ``torchaudio.info`` returned."""
    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


_SUBTYPE_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64}
_INT_DTYPES = {"PCM_16": "int16", "PCM_32": "int32"}  # what load(normalize=False) kept as integers


def set_audio_backend(backend: str | None = None) -> None:
    """No-op: audio is always read with soundfile."""


def get_audio_backend() -> str:
    return "soundfile"


def info(uri: str | os.PathLike, format: str | None = None, **_: object) -> AudioMetaData:
    meta = sf.info(str(uri))
    bits = _SUBTYPE_BITS.get(meta.subtype, 0)
    encoding = "PCM_F" if meta.subtype in ("FLOAT", "DOUBLE") else ("PCM_S" if meta.subtype.startswith("PCM") else meta.subtype)
    return AudioMetaData(int(meta.samplerate), int(meta.frames), int(meta.channels), bits, encoding)


def load(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True, channels_first: bool = True,
         format: str | None = None, buffer_size: int = 4096, backend: str | None = None) -> tuple[torch.Tensor, int]:
    """``(waveform [C, L] float32 in [-1, 1], sample_rate)`` like the old torchaudio.load."""
    source = uri if hasattr(uri, "read") else str(uri)
    dtype = "float32"
    if not normalize and not hasattr(uri, "read"):
        dtype = _INT_DTYPES.get(sf.info(source).subtype, "float32")
    data, rate = sf.read(source, start=frame_offset, frames=num_frames, dtype=dtype, always_2d=True)
    wav = torch.from_numpy(np.ascontiguousarray(data.T if channels_first else data))
    return wav, int(rate)


def save(uri, src: torch.Tensor, sample_rate: int, channels_first: bool = True, format: str | None = None,
         encoding: str | None = None, bits_per_sample: int | None = None, **_: object) -> None:
    data = src.detach().cpu()
    if data.dim() == 1:
        data = data.unsqueeze(0 if channels_first else 1)
    data = data.t() if channels_first else data
    subtype = {8: "PCM_U8", 16: "PCM_16", 24: "PCM_24", 32: "PCM_32"}.get(bits_per_sample or 0)
    if encoding == "PCM_F":
        subtype = "FLOAT"
    sf.write(uri if hasattr(uri, "write") else str(uri), data.float().numpy(), int(sample_rate),
             subtype=subtype, format=format)


# --- sox_effects ------------------------------------------------------------------------------------

def _seconds(text: str, sample_rate: int, effect: str) -> int:
    """A sox time argument (seconds, or samples with an ``s`` suffix) in samples."""
    text = str(text).strip()
    try:
        if text.endswith("s"):
            return int(text[:-1])
        return int(round(float(text) * sample_rate))
    except ValueError:
        raise NotImplementedError(f"torchaudio.sox_effects shim (fedhubert.compat): effect {effect!r} time "
                                  f"{text!r} not supported (use seconds or <N>s samples)") from None


def _peak_to(wav: torch.Tensor, db: float) -> torch.Tensor:
    peak = wav.abs().max()
    return wav if peak == 0 else wav * (10 ** (db / 20) / peak)


def _apply_one(wav: torch.Tensor, sr: int, effect: Sequence[str]) -> tuple[torch.Tensor, int]:
    name, args = str(effect[0]), [str(a) for a in effect[1:]]
    if name == "channels":
        n = int(args[0])
        if n == wav.size(0):
            return wav, sr
        if n == 1:
            return wav.mean(0, keepdim=True), sr
        if wav.size(0) == 1:
            return wav.expand(n, -1).clone(), sr
        raise NotImplementedError(f"sox 'channels {n}' on {wav.size(0)} channels is not supported by the shim")
    if name == "rate":
        new = int(float(args[0].rstrip("k")) * (1000 if args[0].endswith("k") else 1))
        return (wav if new == sr else AF.resample(wav, sr, new)), new
    if name == "gain":
        if args and args[0] == "-n":  # normalise the peak to the given level (default 0 dBFS)
            return _peak_to(wav, float(args[1]) if len(args) > 1 else 0.0), sr
        if len(args) != 1:
            raise NotImplementedError(f"sox 'gain {' '.join(args)}' is not supported by the shim (only 'gain dB', 'gain -n [dB]')")
        return wav * 10 ** (float(args[0]) / 20), sr
    if name == "norm":
        return _peak_to(wav, float(args[0]) if args else 0.0), sr
    if name == "pad":
        before = _seconds(args[0], sr, name) if args else 0
        after = _seconds(args[1], sr, name) if len(args) > 1 else 0
        return torch.nn.functional.pad(wav, (before, after)), sr
    if name == "trim":
        start = _seconds(args[0], sr, name)
        end = start + _seconds(args[1], sr, name) if len(args) > 1 else wav.size(1)
        return wav[:, start:end], sr
    if name == "reverse":
        return wav.flip(1), sr
    raise NotImplementedError(f"torchaudio.sox_effects shim (fedhubert.compat): effect {name!r} is not "
                              f"available without libsox; supported: {', '.join(SUPPORTED_EFFECTS)}")


def apply_effects_tensor(tensor: torch.Tensor, sample_rate: int, effects: Sequence[Sequence[str]],
                         channels_first: bool = True) -> tuple[torch.Tensor, int]:
    """Applies sox-style ``effects`` in order; returns (float32 [C, L] or [L, C], new sample rate)."""
    wav = tensor.float() if channels_first else tensor.float().t()
    if wav.dim() != 2:
        raise ValueError(f"apply_effects_tensor expects a 2-D tensor, got shape {tuple(tensor.shape)}")
    sr = int(sample_rate)
    for effect in effects:
        wav, sr = _apply_one(wav, sr, effect)
    wav = wav.contiguous()
    return (wav if channels_first else wav.t().contiguous()), sr


def apply_effects_file(path, effects: Sequence[Sequence[str]], normalize: bool = True, channels_first: bool = True,
                       format: str | None = None) -> tuple[torch.Tensor, int]:
    wav, sr = load(path)
    return apply_effects_tensor(wav, sr, effects, channels_first=channels_first)


def install() -> None:
    """Puts the missing names on ``torchaudio`` (idempotent)."""
    for name, fn in (("set_audio_backend", set_audio_backend), ("get_audio_backend", get_audio_backend),
                     ("info", info)):
        if not hasattr(torchaudio, name):
            setattr(torchaudio, name, fn)
    if hasattr(torchaudio, "load_with_torchcodec"):  # >= 2.9: load/save need torchcodec, which we do not ship
        torchaudio.load, torchaudio.save = load, save
    if "torchaudio.sox_effects" not in sys.modules and importlib.util.find_spec("torchaudio.sox_effects") is None:
        module = types.ModuleType("torchaudio.sox_effects", "sox_effects shim from fedhubert.compat")
        module.apply_effects_tensor, module.apply_effects_file = apply_effects_tensor, apply_effects_file
        sys.modules["torchaudio.sox_effects"] = module
    torchaudio.sox_effects = importlib.import_module("torchaudio.sox_effects")


install()
