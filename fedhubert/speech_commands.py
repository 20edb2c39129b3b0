"""A small Speech Commands v0.01-layout data set spoken by espeak-ng voices, for s3prl's speech_commands task.

Layout (what s3prl's ``speech_commands`` expert reads, as in the real v0.01 archives):

    <out>/train/<word>/<hash>_nohash_<n>.wav      10 keywords + other words (s3prl maps those to _unknown_)
    <out>/train/_background_noise_/*.wav          noise, >= 1 s each (s3prl crops 1-s _silence_ from them)
    <out>/train/validation_list.txt, testing_list.txt
    <out>/test/<class>/<hash>_nohash_<n>.wav      12 folders: the keywords, _unknown_, _silence_

Every clip is 16 kHz mono 16-bit, exactly 1 s. ``<hash>`` is one voice's id. s3prl ignores the two list
files and splits the train folder itself from the hash (the data set's published rule: sha1 of the hash,
< 10 % validation, < 20 % testing, which s3prl drops, else training), so each voice's hash is chosen
to land in the role we give it; the list files say the same for other tools. Test voices are heard
only in the test set (and, as in v0.01, under testing hashes in the train folder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.signal
import soundfile as sf

from fedhubert.errors import DataError
from fedhubert.espeak import SAMPLE_RATE, VOICES, Utterance, synthesize_many, trim

log = logging.getLogger(__name__)

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# v0.01's 20 auxiliary words, all s3prl's _unknown_ class.
OTHER_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine", "one",
               "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
CLASSES = KEYWORDS + ("_unknown_", "_silence_")
NOISES = ("white_noise", "pink_noise", "brown_noise", "hum")
CLIP = SAMPLE_RATE  # 1 s
_MAX_PER_CLASS = 2 ** 27 - 1  # the data set's constant in its split rule
FILE_NAME = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")


@dataclass
class SpeechCommandsSpec:
    """What to build. Voices are taken from ``voices`` in order: test voices first, then validation,
    then training voices."""
    train_voices: int = 8
    valid_voices: int = 2
    test_voices: int = 2
    other_words: int = 6          # how many of OTHER_WORDS (the _unknown_ class) are spoken
    repeats: int = 2              # takes per voice and word (<hash>_nohash_0.wav, _1.wav ...)
    noise_seconds: float = 5.0    # length of each _background_noise_ file
    seed: int = 0
    voices: Sequence[str] = field(default_factory=lambda: VOICES)

    def check(self) -> None:
        counts = {"train_voices": self.train_voices, "valid_voices": self.valid_voices,
                  "test_voices": self.test_voices, "repeats": self.repeats}
        for name, value in counts.items():
            if value < 1:
                raise DataError(f"speech commands: {name} must be >= 1, got {value}")
        if not 0 <= self.other_words <= len(OTHER_WORDS):
            raise DataError(f"speech commands: other_words must be in [0, {len(OTHER_WORDS)}], got {self.other_words}")
        if self.noise_seconds < 1.0:
            raise DataError(f"speech commands: noise_seconds must be >= 1 (s3prl crops 1 s), got {self.noise_seconds}")
        needed = self.train_voices + self.valid_voices + self.test_voices
        if needed > len(self.voices):
            raise DataError(f"speech commands: {needed} voices asked for, only {len(self.voices)} available")


def split_of(speaker_hash: str) -> str:
    """'validation', 'testing' or 'training': the Speech Commands split rule for a speaker hash."""
    digest = int(hashlib.sha1(speaker_hash.encode("utf-8")).hexdigest(), 16)
    percent = (digest % (_MAX_PER_CLASS + 1)) * (100.0 / _MAX_PER_CLASS)
    return "validation" if percent < 10 else "testing" if percent < 20 else "training"


def voice_hash(voice: str, role: str, seed: int) -> str:
    """An 8-hex-digit id for ``voice`` (seeded, deterministic) whose split is ``role``."""
    for attempt in range(10_000):
        candidate = hashlib.sha1(f"{seed}/{voice}/{attempt}".encode()).hexdigest()[:8]
        if split_of(candidate) == role:
            return candidate
    raise AssertionError("unreachable: every split holds >= 10% of hashes")


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white_noise":
        out = white
    elif kind == "pink_noise":  # 1/f power: scale the spectrum by 1/sqrt(f)
        spec = np.fft.rfft(white)
        spec[1:] /= np.sqrt(np.arange(1, spec.size))
        out = np.fft.irfft(spec, n)
    elif kind == "brown_noise":  # integrated white noise, kept from drifting by a leak
        out = scipy.signal.lfilter([1.0], [1.0, -0.995], white)
    else:  # mains hum with harmonics under a little noise
        t = np.arange(n) / SAMPLE_RATE
        out = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in (1, 2, 3)) + 0.05 * white
    out = out - out.mean()
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def _to_clip(word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The trimmed word at a random position in 1 s, over a faint noise floor (real clips are not
    digital silence)."""
    word = trim(word)[:CLIP]
    clip = (1e-3 * rng.standard_normal(CLIP)).astype(np.float32)
    start = int(rng.integers(0, CLIP - len(word) + 1))
    clip[start:start + len(word)] += 0.8 * word / max(float(np.abs(word).max()), 1e-6)
    return clip


def _write(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")


@dataclass
class BuildSummary:
    train_root: Path
    test_root: Path
    files: dict[str, int]  # training / validation / testing (train folder), test (test folder), noise


def build_speech_commands(out: Path, spec: SpeechCommandsSpec, cache_dir: Path | None = None,
                          workers: int = 4, overwrite: bool = False) -> BuildSummary:
    """Builds ``<out>/train`` and ``<out>/test`` in a temporary folder beside ``out``, then renames it into
    place, so ``out`` is either complete or untouched."""
    spec.check()
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists (remove it, or pass --overwrite)")
    n_test, n_valid = spec.test_voices, spec.valid_voices
    roles = ["testing"] * n_test + ["validation"] * n_valid + ["training"] * spec.train_voices
    voices = list(spec.voices[:len(roles)])
    hashes = [voice_hash(v, role, spec.seed) for v, role in zip(voices, roles)]
    words = list(KEYWORDS + OTHER_WORDS[:spec.other_words])

    # Every take of every word by every voice, with its own seeded rate and pitch.
    rng = np.random.default_rng(spec.seed)
    takes = [(vi, word, n, int(rng.integers(130, 200)), int(rng.integers(30, 71)))
             for vi in range(len(voices)) for word in words for n in range(spec.repeats)]
    audio = synthesize_many([Utterance(w, voices[vi], rate, pitch) for vi, w, n, rate, pitch in takes],
                            cache_dir, workers)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {"training": 0, "validation": 0, "testing": 0, "test": 0, "noise": len(NOISES)}
        lists: dict[str, list[str]] = {"validation": [], "testing": []}
        unknown_n: dict[int, int] = {}
        for (vi, word, n, _, _), wav in zip(takes, audio):
            clip = _to_clip(wav, rng)
            name = f"{hashes[vi]}_nohash_{n}.wav"
            _write(tmp / "train" / word / name, clip)
            counts[roles[vi]] += 1
            if roles[vi] in lists:
                lists[roles[vi]].append(f"{word}/{name}")
            if roles[vi] == "testing":  # the test set: keywords in their folder, other words in _unknown_
                if word in KEYWORDS:
                    _write(tmp / "test" / word / name, clip)
                else:
                    k = unknown_n[vi] = unknown_n.get(vi, -1) + 1
                    _write(tmp / "test" / "_unknown_" / f"{hashes[vi]}_nohash_{k}.wav", clip)
                counts["test"] += 1
        noise_len = int(round(spec.noise_seconds * SAMPLE_RATE))
        noises = {kind: _noise(kind, noise_len, rng) for kind in NOISES}
        for kind, wav in noises.items():
            _write(tmp / "train" / "_background_noise_" / f"{kind}.wav", wav)
        # _silence_ test clips: 1-s crops of the noises at random levels (as v0.01's test set has).
        (tmp / "test" / "_unknown_").mkdir(parents=True, exist_ok=True)
        for i in range(n_test * spec.repeats):
            wav = noises[NOISES[i % len(NOISES)]]
            start = int(rng.integers(0, len(wav) - CLIP + 1))
            clip = wav[start:start + CLIP] * float(rng.uniform(0.1, 1.0))
            name = hashlib.sha1(f"{spec.seed}/silence/{i}".encode()).hexdigest()[:8]
            _write(tmp / "test" / "_silence_" / f"{name}_nohash_0.wav", clip)
            counts["test"] += 1
        for role, names in lists.items():
            (tmp / "train" / f"{role}_list.txt").write_text("".join(f"{p}\n" for p in sorted(names)))
        (tmp / "README.txt").write_text(
            "Speech Commands v0.01-layout set synthesised with espeak-ng by fedhubert (make_speech_commands.py).\n"
            f"voices: {', '.join(f'{v}={h} ({r})' for v, h, r in zip(voices, hashes, roles))}\n")
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():  # overwrite: move the old one aside first, so the swap is two renames
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("speech commands: %s", counts)
    return BuildSummary(out / "train", out / "test", counts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

