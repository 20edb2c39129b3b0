"""Scan a LibriSpeech (or Libri-Light) root into manifest rows.

Layouts, told apart per chapter folder:
  LibriSpeech  ``<root>/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` next to
               ``<spk>-<chapter>.trans.txt``, speakers' sex in ``<root>/SPEAKERS.TXT``. A folder that
               holds a .trans.txt or a file named so is a LibriSpeech chapter: each file in it must be
               named ``<spk>-<chapter>-<utt>.flac`` after its folders (utt_id = that name).
  Libri-Light  ``<root>/<subset>/<speaker>/<book>/<any name>.flac`` (no transcripts, no SPEAKERS.TXT):
               speaker and chapter are the folder names, utt_id is the path below the root without
               ``.flac`` (unique by construction: Libri-Light's file names repeat across books).
Self-supervised pretraining needs no transcripts: a file without one is kept (transcript "") unless
``require_transcripts``. With ``subsets`` empty, LibriSpeech's dev-*/test-* folders are left out: the
downstream tasks evaluate on them. Lengths come from file headers only (one read of a file's first
bytes; a thread pool once the reads wait on the storage), so scanning 1000 hours takes minutes, not the
hours a full decode would.

Files that cannot be used (unreadable, empty, too short, misnamed, no transcript when one is required)
become :class:`Reject` rows with a reason; the scan goes on. A missing root or subset, a root without
subset folders of audio, or a corpus without a single usable file, raises DataError naming the path.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

from fedhubert.audio import probe_audio, read_head, resampled_length
from fedhubert.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

SPEAKERS_FILE = "SPEAKERS.TXT"
UNKNOWN_SEX = "unknown"
_UTT_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")  # <spk>-<chapter>-<utt>
_EVALUATION_SUBSET = re.compile(r"^(dev|test)-")  # LibriSpeech's dev-clean, dev-other, test-clean, test-other
_BATCH = 256  # header reads per task of the scan's thread pool
_WAITING = 2.0  # a batch whose wall time is over this many times its CPU time waited on the storage


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


def is_evaluation_subset(name: str) -> bool:
    """LibriSpeech's dev-*/test-* sets: downstream tasks (ASR, SUPERB) evaluate on them."""
    return _EVALUATION_SUBSET.match(name) is not None


def subset_dirs(root: Path, subsets: list[str]) -> list[Path]:
    """The subset folders to scan: ``subsets`` or, when empty, every subset folder under ``root`` but
    LibriSpeech's dev-*/test-* sets (named in a log line). A named dev/test set gets a warning."""
    if not root.is_dir():
        raise DataError(f"LibriSpeech root not found: {root} (data.librispeech_root)")
    if subsets:
        dirs = [root / name for name in subsets]
        for d in dirs:
            if not d.is_dir():
                raise DataError(f"subset folder not found: {d} (data.subsets)")
        named = [d.name for d in dirs if is_evaluation_subset(d.name)]
        if named:
            log.warning("data.subsets names %s: downstream tasks (ASR, s3prl's SUPERB tasks) evaluate on "
                        "LibriSpeech's dev/test sets, so pretraining on them leaks test speech into the model "
                        "and inflates those results; use them only for a demo", ", ".join(named))
        return dirs
    found = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"no subset folders under the LibriSpeech root {root} (data.librispeech_root)")
    dirs = [d for d in found if not is_evaluation_subset(d.name)]
    skipped = ", ".join(d.name for d in found if is_evaluation_subset(d.name))
    if not dirs:
        raise DataError(f"no training subset folders under {root} (data.librispeech_root), only LibriSpeech "
                        f"evaluation sets ({skipped}), which are left out unless named in data.subsets "
                        f"(e.g. --set data.subsets=[{found[0].name}], with a warning: downstream tasks evaluate "
                        f"on them)")
    if skipped:
        log.info("data.subsets is empty: scanning %s; left out %s (evaluation sets of the downstream tasks; "
                 "name them in data.subsets to pretrain on them anyway)", ", ".join(d.name for d in dirs), skipped)
    return dirs


def read_transcripts(paths: list[str]) -> dict[str, str]:
    """Utterance id -> text from a chapter's ``.trans.txt`` files (a later file's line wins)."""
    texts: dict[str, str] = {}
    for trans in paths:
        with open(trans, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        for line in lines:
            utt, _, text = line.strip().partition(" ")
            if utt:
                texts[utt] = text.strip()
    return texts


@dataclass(frozen=True)
class _Candidate:
    """A .flac with a well-formed name (and a transcript when one is required), waiting for its header."""
    path: str  # absolute, posix
    utt_id: str
    speaker: str
    chapter: str
    subset: str
    transcript: str


def _candidates(root: Path, subset: Path, listing: _Listing, rejects: list[Reject],
                require_transcripts: bool) -> list[_Candidate]:
    """The .flac files of one subset (``listing``) that have a proper name, and a transcript if
    ``require_transcripts``; the others go to ``rejects``."""
    # Strings, not Path operations, per file: at 280,000 files Path sorting, relative_to and parent
    # cost more than reading the headers (the order is the rows' business: they are sorted at the end).
    skip = len(root.as_posix()) + 1
    by_folder: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in listing.flacs:
        rel = path[skip:]
        by_folder[rel.rpartition("/")[0]].append((path, rel))
    found = []
    for folder, items in by_folder.items():
        spk_dir, chapter_dir = folder.split("/")[-2:]
        trans = listing.transcripts.get(items[0][0].rpartition("/")[0], [])
        texts = read_transcripts(trans)
        stems = [rel.rpartition("/")[2][:-len(".flac")] for _, rel in items]
        librispeech = bool(trans) or any(_UTT_NAME.match(s) for s in stems)
        for (path, rel), stem in zip(items, stems):
            if librispeech:
                match = _UTT_NAME.match(stem)
                if not match or match.group(1) != spk_dir or match.group(2) != chapter_dir:
                    rejects.append(Reject(rel, stem, "name is not <spk>-<chapter>-<utt>.flac inside <spk>/<chapter>/"))
                    continue
                utt_id, speaker, chapter = stem, spk_dir, chapter_dir
            else:  # Libri-Light: <speaker>/<book>/<any name>.flac
                utt_id, speaker, chapter = rel[:-len(".flac")], spk_dir, chapter_dir
            text = texts.get(stem, "")
            if require_transcripts and not text:
                what = "empty transcript line" if stem in texts else "no transcript line"
                rejects.append(Reject(rel, utt_id, f"{what} in the chapter's .trans.txt (data.require_transcripts)"))
                continue
            found.append(_Candidate(path, utt_id, speaker, chapter, subset.name, text))
    return found


def _measure(c: _Candidate, root: Path, sexes: dict[str, str], sample_rate: int,
             min_samples: int) -> Utterance | Reject:
    """Header read of one candidate -> a manifest row, or a reject with the reason."""
    return measure_audio(c.path, root, c.utt_id, c.speaker, sexes.get(c.speaker, UNKNOWN_SEX), c.chapter,
                         c.subset, c.transcript, sample_rate, min_samples)


def measure_audio(path: str | Path, root: Path, utt_id: str, speaker: str, sex: str, chapter: str, subset: str,
                  transcript: str, sample_rate: int, min_samples: int) -> Utterance | Reject:
    """Header read of one audio file -> a manifest row (its path relative to ``root``), or a reject with
    the reason (unreadable, empty, no samples, shorter than ``min_samples`` at ``sample_rate``)."""
    path = os.fspath(path)
    rel = path[len(root.as_posix()) + 1:]  # the path under root: relative_to costs 3x more
    try:  # one open per file: its first bytes say both "empty" and, for FLAC, the length
        head = read_head(path)
    except OSError as exc:  # e.g. a dangling symlink
        return Reject(rel, utt_id, f"cannot read file ({exc.strerror})")
    if not head:
        return Reject(rel, utt_id, "empty file (0 bytes)")
    try:
        info = probe_audio(path, head)
    except DataError as exc:
        return Reject(rel, utt_id, str(exc).split(": ", 1)[-1])
    if info.num_frames <= 0:
        return Reject(rel, utt_id, "no audio samples")
    num_samples = resampled_length(info.num_frames, info.sample_rate, sample_rate)
    if num_samples < min_samples:
        return Reject(rel, utt_id, f"too short: {num_samples} samples at {sample_rate} Hz "
                                   f"< data.min_audio_length {min_samples}")
    return Utterance(utt_id, speaker, sex, chapter, subset, rel, info.sample_rate, info.num_frames, info.channels,
                     sample_rate, num_samples, round(info.num_frames / info.sample_rate, 4), transcript)


def read_headers(measure: Callable[[T], Utterance | Reject], items: Sequence[T],
                 workers: int) -> tuple[list[Utterance], list[Reject]]:
    """``measure`` of every item, in batches of :data:`_BATCH` items (a future and a progress update per
    file would cost more than its header). Returns (rows, rejects), each sorted by path.

    Batches are read in this thread while its reads are CPU-bound (the files are in the page cache): there,
    more threads only pass Python's lock around and read fewer files per second than one. The first batch that waits on the storage (wall time over
    :data:`_WAITING` times this thread's CPU time) hands the rest to a pool of ``workers`` threads, whose
    reads then overlap."""
    batches = (items[i:i + _BATCH] for i in range(0, len(items), _BATCH))
    results: list[Utterance | Reject] = []
    with tqdm(total=len(items), desc="reading audio headers", unit="file") as bar:
        for batch in batches:
            wall, cpu = time.perf_counter(), time.thread_time()
            results += [measure(item) for item in batch]
            bar.update(len(batch))
            if workers > 1 and time.perf_counter() - wall > _WAITING * (time.thread_time() - cpu):
                break  # the rest of ``batches`` goes to the pool
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(lambda batch: [measure(item) for item in batch], batches):
                results += done
                bar.update(len(done))
    return (sorted((r for r in results if isinstance(r, Utterance)), key=lambda r: r.path),
            sorted((r for r in results if isinstance(r, Reject)), key=lambda r: r.path))


@dataclass
class _Listing:
    """A subset folder's files, as absolute posix strings: Path objects and pathlib's glob cost more than
    the header reads at 280,000 files."""
    flacs: list[str]                    # every <speaker>/<chapter>/*.flac, sorted
    transcripts: dict[str, list[str]]   # chapter folder -> its *.trans.txt files, sorted


def _entries(folder: str) -> list[os.DirEntry]:
    """What ``folder`` holds; an unreadable folder is skipped with a warning (holds nothing)."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        log.warning("skipped %s: cannot list it (%s)", folder, exc.strerror)
        return []


def _subdirs(folder: str) -> list[str]:
    """The folders in ``folder`` (symlinks to folders too, like a glob's ``*/``)."""
    return [e.path for e in _entries(folder) if e.is_dir()]


def _list_subset(subset: Path) -> _Listing:
    """The ``<speaker>/<chapter or book>/`` files of one subset folder that the scan reads."""
    listing = _Listing([], {})
    for chapter in (c for speaker in _subdirs(subset.as_posix()) for c in _subdirs(speaker)):
        names = [e.name for e in _entries(chapter)]
        listing.flacs += [f"{chapter}/{n}" for n in names if n.endswith(".flac")]
        trans = sorted(f"{chapter}/{n}" for n in names if n.endswith(".trans.txt"))
        if trans:
            listing.transcripts[chapter] = trans
    listing.flacs.sort()
    return listing


def _subset_listings(root: Path, dirs: list[Path], auto: bool) -> dict[Path, _Listing]:
    """Each subset folder's .flac files (and transcripts). A named folder without any is an error; with
    ``auto`` (data.subsets empty) one is left out with a warning (a client folder, a models folder under
    the root), and it is an error, naming data.librispeech_root, only when no folder has any (the root is
    one level off)."""
    listings = {d: _list_subset(d) for d in dirs}
    empty = [d for d in dirs if not listings[d].flacs]
    if auto and len(empty) == len(dirs):
        raise DataError(f"no <subset>/<speaker>/<chapter>/*.flac files under {root}: data.librispeech_root must be "
                        f"the folder that holds the subset folders (e.g. LibriSpeech/, which holds train-clean-100/)")
    if empty and not auto:
        raise DataError(f"subset folder {empty[0]} holds no <speaker>/<chapter>/*.flac files (data.subsets)")
    if empty:
        log.warning("left out %s under %s: no <speaker>/<chapter>/*.flac files in them (name the subsets in "
                    "data.subsets to scan only those)", ", ".join(d.name for d in empty), root)
    return {d: listing for d, listing in listings.items() if listing.flacs}


def _read_sexes(root: Path) -> dict[str, str]:
    """SPEAKERS.TXT's sexes, or {} with a warning when there is none (Libri-Light ships none)."""
    if (root / SPEAKERS_FILE).is_file():
        return read_speakers(root)
    log.warning("%s not found: every speaker's sex is 'unknown' (a LibriSpeech root holds it; Libri-Light "
                "does not)", root / SPEAKERS_FILE)
    return {}


def scan_corpus(root: str | Path, subsets: list[str], sample_rate: int, min_samples: int, workers: int,
                require_transcripts: bool = False) -> tuple[list[Utterance], list[Reject]]:
    """Manifest rows (sorted by path) and rejects of a LibriSpeech root; headers read in parallel.
    ``subsets`` empty: every subset folder but dev-*/test-*. Files without a transcript are kept
    (transcript "") unless ``require_transcripts``."""
    root = Path(root).expanduser().resolve()
    dirs = subset_dirs(root, subsets)
    listings = _subset_listings(root, dirs, auto=not subsets)
    sexes = _read_sexes(root)
    rejects: list[Reject] = []
    candidates = [c for d, listing in listings.items()
                  for c in _candidates(root, d, listing, rejects, require_transcripts)]
    rows, unusable = read_headers(lambda c: _measure(c, root, sexes, sample_rate, min_samples), candidates, workers)
    rejects = sorted(rejects + unusable, key=lambda r: r.path)
    if rejects:
        log.warning("%d of %d audio files rejected (reasons in rejects.csv)", len(rejects),
                    len(rows) + len(rejects))
    untranscribed = sum(not r.transcript for r in rows)
    if untranscribed:
        log.info("%d of %d utterances kept without a transcript (no line in a .trans.txt; pretraining needs "
                 "none; data.require_transcripts: true rejects them)", untranscribed, len(rows))
    unknown = sorted({r.speaker for r in rows if r.sex == UNKNOWN_SEX})
    if unknown and (root / SPEAKERS_FILE).is_file():  # else _read_sexes said so
        log.warning("%d speakers missing from %s (sex 'unknown'): %s", len(unknown), root / SPEAKERS_FILE,
                    ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    if not rows:
        raise DataError(f"no usable audio under {root} (subsets: {', '.join(d.name for d in dirs)}; "
                        f"{len(rejects)} files rejected)")
    return rows, rejects
