"""Scan a LibriSpeech root in the released layout into manifest rows.

Layout: ``<root>/SPEAKERS.TXT`` and ``<root>/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac``
next to ``<spk>-<chapter>.trans.txt``. Lengths come from file headers only (read by a thread pool),
so scanning 1000 hours takes minutes, not the hours a full decode would.

Files that cannot be used (unreadable, empty, too short, no transcript line, misnamed) become
:class:`Reject` rows with a reason; the scan goes on. A missing root or subset, or a corpus without
a single usable file, raises DataError naming the path.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from fedhubert.audio import probe_audio, resampled_length
from fedhubert.errors import DataError

log = logging.getLogger(__name__)

SPEAKERS_FILE = "SPEAKERS.TXT"
UNKNOWN_SEX = "unknown"
_UTT_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")  # <spk>-<chapter>-<utt>
_BATCH = 256  # header reads per task of the scan's thread pool


@dataclass(frozen=True)
class Utterance:
    """One usable utterance: a manifest.csv row."""
    utt_id: str
    speaker: str
    sex: str              # F, M or unknown (from SPEAKERS.TXT)
    chapter: str
    subset: str
    path: str             # relative to the LibriSpeech root, as in the fairseq .tsv
    orig_sample_rate: int
    orig_num_samples: int
    channels: int
    sample_rate: int      # cfg.data.sample_rate
    num_samples: int      # length after resampling to sample_rate: what the model sees
    duration: float       # seconds
    transcript: str


@dataclass(frozen=True)
class Reject:
    """A file left out of the manifest, and why: a rejects.csv row."""
    path: str
    utt_id: str
    reason: str


CSV_COLUMNS = [f.name for f in fields(Utterance)]
REJECT_COLUMNS = [f.name for f in fields(Reject)]


def read_speakers(root: Path) -> dict[str, str]:
    """Speaker id -> sex ('F'/'M') from ``SPEAKERS.TXT`` (``ID | SEX | SUBSET | MINUTES | NAME``)."""
    path = root / SPEAKERS_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: data.librispeech_root must be the LibriSpeech root "
                        f"(the folder that holds {SPEAKERS_FILE} and the subset folders)")
    sexes: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        parts = [p.strip() for p in line.split("|", 4)]  # names may hold '|' themselves
        if len(parts) < 2 or not parts[0]:
            log.warning("%s:%d: not an 'ID | SEX | ...' line, ignored", path, lineno)
            continue
        sex = parts[1].upper()
        sexes[parts[0]] = sex if sex in ("F", "M") else UNKNOWN_SEX
    return sexes


def subset_dirs(root: Path, subsets: list[str]) -> list[Path]:
    """The subset folders to scan: ``subsets`` or, when empty, every subset folder under ``root``."""
    if not root.is_dir():
        raise DataError(f"LibriSpeech root not found: {root} (data.librispeech_root)")
    if subsets:
        dirs = [root / name for name in subsets]
        for d in dirs:
            if not d.is_dir():
                raise DataError(f"subset folder not found: {d} (data.subsets)")
    else:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not dirs:
            raise DataError(f"no subset folders under the LibriSpeech root {root}")
    return dirs


def read_transcripts(chapter_dir: Path) -> dict[str, str]:
    """Utterance id -> text from every ``*.trans.txt`` of a chapter folder."""
    texts: dict[str, str] = {}
    for trans in sorted(chapter_dir.glob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8", errors="replace").splitlines():
            utt, _, text = line.strip().partition(" ")
            if utt:
                texts[utt] = text.strip()
    return texts


@dataclass(frozen=True)
class _Candidate:
    """A .flac with a well-formed name and a transcript line, waiting for its header to be read."""
    path: Path
    utt_id: str
    speaker: str
    chapter: str
    subset: str
    transcript: str


def _candidates(root: Path, subset: Path, rejects: list[Reject]) -> list[_Candidate]:
    """The .flac files of one subset that have a proper name and a transcript line."""
    # Strings, not Path operations, per file: at 280,000 files Path sorting, relative_to and parent
    # cost more than reading the headers (the order is the rows' business: they are sorted at the end).
    flacs = sorted(subset.glob("*/*/*.flac"), key=str)
    if not flacs:
        raise DataError(f"subset folder {subset} holds no <spk>/<chapter>/*.flac files (data.subsets)")
    found, texts_by_dir, skip = [], {}, len(root.as_posix()) + 1
    for path in flacs:
        rel = path.as_posix()[skip:]
        spk_dir, chapter_dir, name = rel.rsplit("/", 3)[-3:]
        utt_id = name[:-len(".flac")]
        match = _UTT_NAME.match(utt_id)
        if not match or match.group(1) != spk_dir or match.group(2) != chapter_dir:
            rejects.append(Reject(rel, utt_id, "name is not <spk>-<chapter>-<utt>.flac inside <spk>/<chapter>/"))
            continue
        folder = rel[:-len(name) - 1]
        if folder not in texts_by_dir:
            texts_by_dir[folder] = read_transcripts(path.parent)
        text = texts_by_dir[folder].get(utt_id)
        if text is None:
            rejects.append(Reject(rel, utt_id, "no transcript line in the chapter's .trans.txt"))
            continue
        found.append(_Candidate(path, utt_id, match.group(1), match.group(2), subset.name, text))
    return found


def _measure(c: _Candidate, root: Path, sexes: dict[str, str], sample_rate: int,
             min_samples: int) -> Utterance | Reject:
    """Header read of one candidate -> a manifest row, or a reject with the reason."""
    rel = c.path.as_posix()[len(root.as_posix()) + 1:]  # the path under root: relative_to costs 3x more
    try:
        if c.path.stat().st_size == 0:
            return Reject(rel, c.utt_id, "empty file (0 bytes)")
    except OSError as exc:  # e.g. a dangling symlink
        return Reject(rel, c.utt_id, f"cannot read file ({exc.strerror})")
    try:
        info = probe_audio(c.path)
    except DataError as exc:
        return Reject(rel, c.utt_id, str(exc).split(": ", 1)[-1])
    if info.num_frames <= 0:
        return Reject(rel, c.utt_id, "no audio samples")
    num_samples = resampled_length(info.num_frames, info.sample_rate, sample_rate)
    if num_samples < min_samples:
        return Reject(rel, c.utt_id, f"too short: {num_samples} samples at {sample_rate} Hz "
                                     f"< data.min_audio_length {min_samples}")
    return Utterance(c.utt_id, c.speaker, sexes.get(c.speaker, UNKNOWN_SEX), c.chapter, c.subset, rel,
                     info.sample_rate, info.num_frames, info.channels, sample_rate, num_samples,
                     round(info.num_frames / info.sample_rate, 4), c.transcript)


def _measure_all(pool: ThreadPoolExecutor, candidates: list[_Candidate],
                 measure: Callable[[_Candidate], Utterance | Reject]) -> list[Utterance | Reject]:
    """``measure`` of every candidate, in order, by the pool's threads, in batches of
    :data:`_BATCH` files: a future and a progress update per file would cost more than its header."""
    batches = [candidates[i:i + _BATCH] for i in range(0, len(candidates), _BATCH)]
    results: list[Utterance | Reject] = []
    with tqdm(total=len(candidates), desc="reading audio headers", unit="file") as bar:
        for done in pool.map(lambda batch: [measure(c) for c in batch], batches):
            results += done
            bar.update(len(done))
    return results


def scan_corpus(root: str | Path, subsets: list[str], sample_rate: int, min_samples: int,
                workers: int) -> tuple[list[Utterance], list[Reject]]:
    """Manifest rows (sorted by path) and rejects of a LibriSpeech root; headers read in parallel."""
    root = Path(root).expanduser().resolve()
    dirs = subset_dirs(root, subsets)
    sexes = read_speakers(root)
    rejects: list[Reject] = []
    candidates = [c for d in dirs for c in _candidates(root, d, rejects)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = _measure_all(pool, candidates, lambda c: _measure(c, root, sexes, sample_rate, min_samples))
    rows = sorted((r for r in results if isinstance(r, Utterance)), key=lambda r: r.path)
    rejects = sorted(rejects + [r for r in results if isinstance(r, Reject)], key=lambda r: r.path)
    if rejects:
        log.warning("%d of %d audio files rejected (reasons in rejects.csv)", len(rejects),
                    len(rows) + len(rejects))
    unknown = sorted({r.speaker for r in rows if r.sex == UNKNOWN_SEX})
    if unknown:
        log.warning("%d speakers missing from %s (sex 'unknown'): %s", len(unknown), root / SPEAKERS_FILE,
                    ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    if not rows:
        raise DataError(f"no usable audio under {root} (subsets: {', '.join(d.name for d in dirs)}; "
                        f"{len(rejects)} files rejected)")
    return rows, rejects
