"""Audio in one place: soundfile reads, mono mix, torchaudio resampling, and the exact length a
resampled file will have (so manifests can list it from the header alone, without decoding).

torchaudio >= 2.9 has no ``torchaudio.load``; soundfile reads every format libsndfile knows (FLAC,
WAV, OGG, ...). Every module loads audio through :func:`load_audio`, or :func:`load_crop` when it needs
only a stretch of the file (a training crop: only those frames are decoded).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio

from fedhubert.errors import DataError


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says."""
    sample_rate: int
    num_frames: int  # samples per channel at ``sample_rate``
    channels: int


FLAC_HEAD_BYTES = 26  # the ``fLaC`` marker and the STREAMINFO fields up to the total sample count


def read_head(path: str | os.PathLike, size: int = FLAC_HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of ``path`` (fewer for a shorter file); raises OSError. A bare descriptor:
    a buffered file object costs 3x more, which shows when 280,000 headers are read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def parse_flac_head(head: bytes) -> AudioInfo | None:
    """What libsndfile reports for a FLAC file, from its first 26 bytes: the ``fLaC`` marker and the
    STREAMINFO block that must follow it. None (ask libsndfile) for anything else: another format, an
    ID3 tag first, or a stream that does not record its length. A tenth of libsndfile's cost per file,
    which decides the scan of a 280,000-file corpus."""
    # bytes 4-7: last-block flag and type (0 = STREAMINFO), length 34; 8-17: block and frame sizes;
    # 18-25: sample rate (20 bits), channels - 1 (3), bits per sample - 1 (5), total samples (36)
    if len(head) < FLAC_HEAD_BYTES or head[:4] != b"fLaC" or head[4] & 0x7F != 0 or head[5:8] != b"\x00\x00\x22":
        return None
    bits = int.from_bytes(head[18:26], "big")
    rate, channels, frames = bits >> 44, ((bits >> 41) & 0x7) + 1, bits & ((1 << 36) - 1)
    return AudioInfo(rate, frames, channels) if rate and frames else None


def probe_audio(path: str | os.PathLike, head: bytes | None = None) -> AudioInfo:
    """Reads only the header of ``path`` (``head``: its first bytes, already read by the caller); an
    unreadable or corrupt file raises DataError."""
    try:
        fast = parse_flac_head(read_head(path) if head is None else head)
    except OSError as exc:
        raise DataError(f"{path}: not readable audio ({_short(exc)})") from None
    if fast is not None:
        return fast
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: not readable audio ({_short(exc)})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise DataError(f"{path}: header has sample rate {info.samplerate}, {info.channels} channels")
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))


def resampled_length(num_frames: int, orig_rate: int, new_rate: int) -> int:
    """Length of ``torchaudio.functional.resample`` output for ``num_frames`` input samples.

    torchaudio keeps ``ceil(new * n / orig)`` samples (rates divided by their gcd), evaluated as a
    default-dtype tensor; we evaluate it the same way so the count matches bit for bit (a float64 or
    exact-integer ceil can differ by one sample for long files at e.g. 44.1 kHz)."""
    if orig_rate == new_rate:
        return int(num_frames)
    g = math.gcd(int(orig_rate), int(new_rate))  # Python ints: a numpy scalar would make a float64 tensor
    orig, new = int(orig_rate) // g, int(new_rate) // g
    return int(torch.ceil(torch.as_tensor(new * int(num_frames) / orig)).long())


def load_audio(path: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform ``[L]`` of ``path`` at ``sample_rate`` (channels averaged, resampled)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: cannot decode audio ({_short(exc)})") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: audio is empty (0 samples)")
    wav = _mono(data)
    if rate != sample_rate:
        wav = _resampler(int(rate), int(sample_rate))(wav)
    return wav.contiguous()  # a no-op unless resampled


def load_crop(path: str | os.PathLike, sample_rate: int, offset: int, length: int) -> tuple[torch.Tensor, int]:
    """(samples ``[offset, offset + length)`` of ``load_audio(path, sample_rate)``, the whole file's length
    at ``sample_rate``). A file at ``sample_rate`` is sought to ``offset`` and only ``length`` frames are
    decoded, bit-identical to slicing the whole decode (libsndfile seeks FLAC and PCM to the exact sample).
    A file at another rate is decoded whole and resampled, then sliced: resampling a stretch alone would
    differ from the whole file's samples by rounding near its edges. A crop past the end comes back
    short; the caller compares the length with its manifest (the header's, for a range read)."""
    try:
        with sf.SoundFile(str(path)) as f:
            if f.samplerate == sample_rate and f.seekable():
                total = int(f.frames)
                if offset >= total:  # seeking there fails; the caller reports the stale length
                    return torch.zeros(0), total
                f.seek(offset)
                return _mono(f.read(length, dtype="float32", always_2d=True)), total
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: cannot decode audio ({_short(exc)})") from None
    wav = load_audio(path, sample_rate)
    return wav[offset:offset + length].clone(), int(wav.shape[-1])  # clone: not the whole decode kept alive


def _mono(data: np.ndarray) -> torch.Tensor:
    """``[frames, channels]`` float32 samples as one contiguous channel ``[frames]`` (channels averaged).
    Copied by numpy: a torch copy of this size wakes every intra-op thread of a busy training process."""
    return torch.from_numpy(np.ascontiguousarray(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]))


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    """torchaudio.functional.resample with its sinc kernel built once per rate pair (building it
    costs more than resampling a whole utterance, e.g. 0.2 s for 22.05 -> 16 kHz). A float32 kernel,
    as the functional form builds for float32 input, gives bit-identical output."""
    return torchaudio.transforms.Resample(orig_rate, new_rate, dtype=torch.float32)


def _short(exc: BaseException) -> str:
    """First line of an exception message (libsndfile's are long and multi-line)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
