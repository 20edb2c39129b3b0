"""The evaluation's data: speech no model trained on, cut into what the probes need.

- Speaker set: the partition's held-out utterances (``heldout.csv``, ``partition.heldout_per_speaker``
  per speaker), or, when there are none, every client's validation utterances. Each utterance is cut
  into segments of ``evaluation.segment_seconds``; each speaker's utterances alternate between the
  probe's train and test halves, so a speaker-ID classifier is always tested on utterances it never saw.
- Keyword set: ``evaluation.keywords`` spoken by ``evaluation.keyword_voices`` espeak-ng voices at every
  ``evaluation.keyword_rates``; the last ``keyword_test_voices`` voices are the test half, so the
  keyword classifier is tested on voices it never heard (content, not speaker).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedhubert.audio import load_audio
from fedhubert.config import FRAME_LENGTH, Config
from fedhubert.data import read_text
from fedhubert.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ProbeSet:
    """Waveforms with a class label each and a train/test flag; ``group`` is the utterance (speaker
    set) or voice (keyword set) a clip came from."""
    name: str
    waveforms: list[torch.Tensor] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    is_test: list[bool] = field(default_factory=list)

    def add(self, wav: torch.Tensor, label: str, group: str, test: bool) -> None:
        self.waveforms.append(wav)
        self.labels.append(label)
        self.groups.append(group)
        self.is_test.append(test)

    def __len__(self) -> int:
        return len(self.waveforms)

    def seconds(self, sample_rate: int) -> float:
        return sum(len(w) for w in self.waveforms) / sample_rate


CSV_NEEDS = ("utt_id", "speaker", "path")  # the manifest.csv columns the speaker set reads


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a manifest .csv; a file that is not UTF-8 CSV with CSV_NEEDS filled in on every row is
    a DataError naming the file and line."""
    reader = csv.DictReader(io.StringIO(read_text(path, "manifest"), newline=""))
    rows = []
    try:
        for row in reader:
            if any(not row.get(column) for column in CSV_NEEDS):
                raise DataError(f"{path}:{reader.line_num}: needs the columns {', '.join(CSV_NEEDS)} filled in; "
                                "rerun partition_data.py")
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not CSV ({exc}); rerun partition_data.py") from None
    return rows


def speaker_utterances(cfg: Config) -> tuple[list[dict[str, str]], str]:
    """(manifest rows, where they came from): held-out utterances, else the clients' validation splits."""
    parts = Path(cfg.data.partitions_dir)
    heldout = parts / "heldout.csv"
    if heldout.is_file():
        rows = _csv_rows(heldout)
        if rows:
            return rows, str(heldout)
    rows = []
    for k in range(cfg.partition.num_clients):
        path = parts / f"client_{k}" / "valid.csv"
        if not path.is_file():
            raise DataError(f"{path} is missing: run partition_data.py with the same config first")
        rows += _csv_rows(path)
    return rows, f"the clients' valid.csv files under {parts}"


def segments(wav: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Non-overlapping ``length``-sample segments; a shorter rest of at least half a segment is kept,
    and an utterance shorter than one segment is one segment."""
    if len(wav) <= length:
        return [wav]
    out = [wav[i:i + length] for i in range(0, len(wav) - length + 1, length)]
    rest = len(wav) % length
    if rest >= length // 2 and rest >= FRAME_LENGTH:
        out.append(wav[len(wav) - rest:])
    return out


def speaker_set(cfg: Config) -> ProbeSet:
    """Segments of held-out speech, labelled by speaker; utterances alternate train/test per speaker."""
    rows, source = speaker_utterances(cfg)
    root = Path(cfg.data.librispeech_root)
    by_speaker: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_speaker[row["speaker"]].append(row)
    out, length = ProbeSet("speaker"), int(cfg.evaluation.segment_seconds * cfg.data.sample_rate)
    dropped = sorted(s for s, r in by_speaker.items() if len(r) < 2)
    for speaker in sorted(set(by_speaker) - set(dropped)):
        for i, row in enumerate(sorted(by_speaker[speaker], key=lambda r: r["utt_id"])):
            for seg in segments(load_audio(root / row["path"], cfg.data.sample_rate), length):
                out.add(seg, speaker, row["utt_id"], test=i % 2 == 1)
    if dropped:
        log.warning("speaker probes: %d speakers have fewer than 2 utterances in %s and are left out",
                    len(dropped), source)
    if len({lab for lab in out.labels}) < 2:
        raise DataError(f"speaker probes need at least 2 speakers with 2 or more utterances in {source}; "
                        "set partition.heldout_per_speaker (e.g. 4) and re-run partition_data.py")
    log.info("speaker set: %d segments (%.0f s) of %d speakers from %s", len(out),
             out.seconds(cfg.data.sample_rate), len(set(out.labels)), source)
    return out


def keyword_set(cfg: Config, cache_dir: Path) -> ProbeSet:
    """The keywords in every voice and rate; the last ``keyword_test_voices`` voices are the test half."""
    from fedhubert.espeak import VOICES, Utterance, synthesize_many, trim

    e = cfg.evaluation
    if e.keyword_voices > len(VOICES):
        raise DataError(f"evaluation.keyword_voices is {e.keyword_voices}; espeak-ng offers {len(VOICES)} here")
    voices = VOICES[:e.keyword_voices]
    jobs = [Utterance(word, voice, rate) for voice in voices for rate in e.keyword_rates for word in e.keywords]
    audio = synthesize_many(jobs, cache_dir)
    test_voices = set(voices[-e.keyword_test_voices:])
    out = ProbeSet("keyword")
    for job, wav in zip(jobs, audio):
        clip = trim(wav)
        if len(clip) < FRAME_LENGTH:
            clip = np.pad(clip, (0, FRAME_LENGTH - len(clip)))
        out.add(torch.from_numpy(np.ascontiguousarray(clip)), job.text, job.voice, test=job.voice in test_voices)
    log.info("keyword set: %d clips (%.0f s), %d words x %d voices x %d rates, %d voices held out", len(out),
             out.seconds(16000), len(e.keywords), len(voices), len(e.keyword_rates), len(test_voices))
    return out
