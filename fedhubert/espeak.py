"""espeak-ng speech synthesis: a word or sentence in one voice, as 16 kHz mono float32 numpy audio.

Shared by the synthetic test sets (``fedhubert.speech_commands``) and probes that need the same content
spoken by many distinct voices. espeak-ng has no randomness: the same text, voice, rate and pitch give
the same samples, so results are cached on disk (keyed by all of them and the espeak-ng version), and
``synthesize_many`` runs the espeak-ng processes in a small thread pool (threads only wait on them).
"""

from __future__ import annotations

import functools
import hashlib
import math
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.signal
import soundfile as sf

from fedhubert.errors import FedHubertError
from fedhubert.fileio import atomic_path

SAMPLE_RATE = 16000
DEFAULT_RATE = 160   # espeak-ng words per minute (its own default is 175)
DEFAULT_PITCH = 50   # espeak-ng pitch, 0..99

# English accents (espeak-ng language names) and voice variants (the !v/ files). A voice is
# "<accent>+<variant>"; both change the sound (accent: phonemes and prosody; variant: pitch, formants).
# "en" is British English: espeak-ng ignores a variant on "en-gb" (see check_voice). en-us-nyc is left out:
# many words sound exactly as in en-us.
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("f1", "m1", "f2", "m2", "f3", "m3", "f4", "m4", "f5", "m5", "m6", "m7", "m8")
# 7 accents x 13 variants = 91 voices. Because 7 and 13 are coprime, voice k = accent k % 7 with variant
# k % 13 visits every pair exactly once, and any prefix of the list mixes accents, variants and sexes.
VOICES: tuple[str, ...] = tuple(f"{ACCENTS[k % len(ACCENTS)]}+{VARIANTS[k % len(VARIANTS)]}"
                                for k in range(len(ACCENTS) * len(VARIANTS)))


class EspeakError(FedHubertError):
    """espeak-ng is missing, a voice is unknown, or synthesis failed."""


@dataclass(frozen=True)
class Utterance:
    """One synthesis request."""
    text: str
    voice: str
    rate: int = DEFAULT_RATE
    pitch: int = DEFAULT_PITCH


def _executable() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakError("espeak-ng not found on PATH (install it: apt-get install espeak-ng)")
    return path


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    """``espeak-ng --version`` (part of the cache key: another version may sound different)."""
    return subprocess.run([_executable(), "--version"], capture_output=True, text=True, check=True).stdout.strip()


@functools.lru_cache(maxsize=1)
def _known_names() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(languages, voice files, variants) espeak-ng lists, lower-cased. espeak-ng silently falls back to
    a default voice for an unknown name, so we check names ourselves."""
    def table(arg: str) -> list[list[str]]:
        out = subprocess.run([_executable(), arg], capture_output=True, text=True, check=True).stdout
        return [line.split() for line in out.splitlines()[1:] if line.strip()]

    def file_of(row: list[str]) -> str:  # the File column: the first path after Pty, Language, Age/Gender
        return next((cell for cell in row[3:] if "/" in cell), "")
    rows = [row for row in table("--voices") if len(row) > 1 and not file_of(row).startswith("mb/")]  # no mbrola
    languages = frozenset(row[1].lower() for row in rows)
    files = frozenset(file_of(row).split("/")[-1].lower() for row in rows) - {""}
    variants = frozenset(file_of(row).split("/")[-1].lower() for row in table("--voices=variant")) - {""}
    return languages, files, variants


def check_voice(voice: str) -> None:
    """Raises EspeakError unless espeak-ng will really use ``voice``: ``<language>``, or
    ``<voice file>+<variant>``. With a variant the name must be a voice file (``en``, ``en-us``,
    ``en-gb-scotland``...): espeak-ng drops the variant of a name it resolves by language (``en-gb+m3``
    sounds exactly like ``en-gb``)."""
    languages, files, variants = _known_names()
    name, _, variant = voice.lower().partition("+")
    if variant:
        ok = name in files and variant in variants
    else:
        ok = name in languages or name in files
    if not ok:
        raise EspeakError(f"espeak-ng voice {voice!r} is unknown or would drop its variant (see espeak-ng "
                          "--voices and --voices=variant; use the File column's name before '+')")


def cache_key(utt: Utterance) -> str:
    parts = [espeak_version(), utt.text, utt.voice, str(utt.rate), str(utt.pitch), str(SAMPLE_RATE)]
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()


def _run_espeak(utt: Utterance) -> np.ndarray:
    check_voice(utt.voice)
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        wav = Path(tmp) / "out.wav"
        # "--" ends the options, so a text starting with "-" is spoken, not parsed.
        cmd = [_executable(), "-v", utt.voice, "-s", str(utt.rate), "-p", str(utt.pitch), "-w", str(wav),
               "--", utt.text]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not wav.is_file():
            raise EspeakError(f"espeak-ng failed for {utt}: {run.stderr.strip()[-300:]}")
        data, rate = sf.read(wav, dtype="float32", always_2d=True)
    data = data.mean(axis=1)
    if rate != SAMPLE_RATE:  # espeak-ng writes 22050 Hz; polyphase resampling is exact enough and fast
        g = math.gcd(rate, SAMPLE_RATE)
        data = scipy.signal.resample_poly(data, SAMPLE_RATE // g, rate // g)
    return np.ascontiguousarray(data, dtype=np.float32)


def synthesize(text: str, voice: str, rate: int = DEFAULT_RATE, cache_dir: Path | None = None, *,
               pitch: int = DEFAULT_PITCH) -> np.ndarray:
    """``text`` spoken by ``voice`` at ``rate`` words/minute: 16 kHz mono float32 (with espeak-ng's
    leading and trailing silence; see ``trim``). With ``cache_dir``, reads/writes ``<key>.npy`` there."""
    utt = Utterance(text, voice, int(rate), int(pitch))
    if not text.strip():
        raise EspeakError("espeak-ng: nothing to say (empty text)")
    path = None
    if cache_dir is not None:
        key = cache_key(utt)
        path = Path(cache_dir) / key[:2] / f"{key}.npy"
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError):
                pass  # unreadable entry (e.g. disk trouble): synthesize again and replace it
    audio = _run_espeak(utt)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # np.save(path) would add ".npy" to tmp
            np.save(handle, audio)
    return audio


def synthesize_many(utterances: Sequence[Utterance], cache_dir: Path | None = None,
                    workers: int = 4) -> list[np.ndarray]:
    """``synthesize`` for each utterance, in order; ``workers`` espeak-ng processes at a time."""
    def one(utt: Utterance) -> np.ndarray:
        return synthesize(utt.text, utt.voice, utt.rate, cache_dir, pitch=utt.pitch)
    if workers <= 1 or len(utterances) <= 1:
        return [one(u) for u in utterances]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, utterances))


def trim(audio: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
    """Cuts leading/trailing samples quieter than ``threshold`` x the peak, keeping ``margin`` samples
    (10 ms at 16 kHz) on each side. Silent input comes back unchanged."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak == 0.0:
        return audio
    loud = np.flatnonzero(np.abs(audio) >= threshold * peak)
    return audio[max(0, loud[0] - margin): loud[-1] + 1 + margin]
