"""Scale: the LibriSpeech-960-shaped test corpus (scripts/make_scale_corpus.py), small per-node state in
the simulation, and per-client k-means targets in parallel processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fedhubert.librispeech import read_speakers, scan_corpus

SCRIPT = REPO / "scripts" / "make_scale_corpus.py"


def make_scale_corpus(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True)


def test_the_scale_corpus_is_a_librispeech_root_of_training_readers(tmp_path):
    root = tmp_path / "ls"
    done = make_scale_corpus(root, "--speakers", "6", "--utterances", "5", "--per-chapter", "2")
    assert done.returncode == 0, done.stderr
    rows, rejects = scan_corpus(root, [], 16000, 0, 2)
    assert not rejects and len(rows) == 30
    assert len({r.speaker for r in rows}) == 6 and len({(r.speaker, r.chapter) for r in rows}) == 18
    sexes = read_speakers(root)
    assert all(sexes[r.speaker] == r.sex in ("F", "M") for r in rows)  # every reader in SPEAKERS.TXT
    assert {r.subset for r in rows} <= {"train-clean-100", "train-clean-360", "train-other-500"}
    assert all(r.transcript for r in rows)
    assert (root / "LICENSE.TXT").is_file() and not list(tmp_path.glob(".ls.*"))  # no temp folder left
    again = make_scale_corpus(root)  # never written over
    assert again.returncode == 2 and "already exists" in again.stderr


def test_more_speakers_than_librispeech_960_get_made_up_readers():
    sys.path.insert(0, str(SCRIPT.parent))
    from make_scale_corpus import BUNDLED, choose_readers, training_readers

    real = training_readers(BUNDLED / "SPEAKERS.TXT")
    assert len(real) == 2338  # LibriSpeech-960's readers: 251 + 921 + 1166
    assert choose_readers(real, 2338) == real
    some = choose_readers(real, 40)  # evenly spaced: every training subset keeps a share
    assert len(set(some)) == 40 and {r[2] for r in some} == {"train-clean-100", "train-clean-360", "train-other-500"}
    more = choose_readers(real, 2341)
    assert more[:2338] == real and len({r[0] for r in more}) == 2341
    assert all(int(r[0]) > int(real[-1][0]) and r[1] in "FM" for r in more[2338:])
