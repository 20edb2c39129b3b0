"""Corpus scanning (fedhubert/librispeech.py) and audio loading (fedhubert/audio.py)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from conftest import BAD_FILES, BUNDLED, STEREO_8K, SUBSET, add_utterance, copy_corpus
from fedhubert.audio import load_audio, probe_audio, resampled_length
from fedhubert.errors import DataError
from fedhubert.librispeech import read_speakers, scan_corpus


def scan(root, subsets=(), workers=4, sample_rate=16000, min_samples=400):
    return scan_corpus(root, list(subsets), sample_rate, min_samples, workers)


def test_bundled_corpus_manifest_matches_headers_and_metadata(bundled_copy):
    rows, rejects = scan(bundled_copy)
    assert len(rows) == 100 and not rejects
    assert [r.path for r in rows] == sorted(r.path for r in rows)
    sexes = read_speakers(bundled_copy)
    for r in rows[::7]:
        info = sf.info(bundled_copy / r.path)
        assert (r.orig_num_samples, r.orig_sample_rate) == (info.frames, info.samplerate)
        assert r.channels == info.channels
        assert r.num_samples == info.frames and r.sample_rate == 16000
        assert r.duration == pytest.approx(info.frames / info.samplerate, abs=1e-3)
        assert r.sex == sexes[r.speaker] and r.sex in ("F", "M")
        assert r.path == f"{SUBSET}/{r.speaker}/{r.chapter}/{r.utt_id}.flac"
        trans = (bundled_copy / r.path).parent / f"{r.speaker}-{r.chapter}.trans.txt"
        assert f"{r.utt_id} {r.transcript}" in trans.read_text().splitlines()
    assert len({r.speaker for r in rows}) == 10


def test_scan_reads_headers_only(bundled_copy, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("scan decoded audio")
    monkeypatch.setattr(sf, "read", no_decode)
    rows, _ = scan(bundled_copy, workers=3)
    assert len(rows) == 100


def test_rejects_and_resampled_stereo(dirty_corpus, caplog):
    caplog.set_level(logging.WARNING)
    rows, rejects = scan(dirty_corpus)
    reasons = {r.utt_id: r.reason for r in rejects}
    assert set(reasons) == set(BAD_FILES.values())
    assert "not readable audio" in reasons[BAD_FILES["corrupt"]]
    assert "empty file" in reasons[BAD_FILES["empty"]]
    assert "no transcript line" in reasons[BAD_FILES["untranscribed"]]
    assert "too short" in reasons[BAD_FILES["short"]] and "data.min_audio_length" in reasons[BAD_FILES["short"]]
    assert "4 of 21 audio files rejected" in caplog.text

    (stereo,) = [r for r in rows if r.utt_id == STEREO_8K]
    assert (stereo.orig_sample_rate, stereo.channels, stereo.sample_rate) == (8000, 2, 16000)
    wav = load_audio(dirty_corpus / stereo.path, 16000)
    assert wav.ndim == 1 and wav.dtype == torch.float32
    assert stereo.num_samples == wav.shape[0] == resampled_length(stereo.orig_num_samples, 8000, 16000)
    assert stereo.duration == pytest.approx(stereo.orig_num_samples / 8000, abs=1e-3)


def test_too_short_after_resampling_counts_target_rate(tmp_path):
    root = copy_corpus(tmp_path, speakers=["1688"], utts_per_speaker=1)
    add_utterance(root, "1688-142285-0950", np.zeros(250, np.float32), sample_rate=8000)  # 500 at 16 kHz
    rows, rejects = scan(root, min_samples=400)
    assert "1688-142285-0950" in {r.utt_id for r in rows} and not rejects
    rows, rejects = scan(root, min_samples=600)
    assert [r.utt_id for r in rejects] == ["1688-142285-0950"]


def test_misnamed_file_is_rejected(tmp_path):
    root = copy_corpus(tmp_path, speakers=["1688"], utts_per_speaker=1)
    chapter = root / SUBSET / "1688" / "142285"
    shutil.copy(next(chapter.glob("*.flac")), chapter / "x.flac")
    rows, rejects = scan(root)
    assert len(rows) == 1 and [r.path.rsplit("/", 1)[1] for r in rejects] == ["x.flac"]


def test_unknown_speaker_gets_unknown_sex(tmp_path, caplog):
    root = copy_corpus(tmp_path, speakers=["1688"], utts_per_speaker=1)
    src, _ = sf.read(BUNDLED / SUBSET / "1688/142285/1688-142285-0000.flac", dtype="float32")
    add_utterance(root, "77777-1-0000", src)
    caplog.set_level(logging.WARNING)
    rows, _ = scan(root)
    sexes = {r.speaker: r.sex for r in rows}
    assert sexes == {"1688": read_speakers(root)["1688"], "77777": "unknown"}
    assert "77777" in caplog.text and "SPEAKERS.TXT" in caplog.text


def test_speakers_txt_names_with_pipes(tmp_path):
    (tmp_path / "SPEAKERS.TXT").write_text("; comment\n;ID |SEX| SUBSET |MINUTES| NAME\n"
                                           "60   | M | train-clean-100  | 20.18 | |CBW|Simon\n"
                                           "61   | f | dev-clean | 5.0 | Someone\n7 | ? | x | 1 | y\n")
    assert read_speakers(tmp_path) == {"60": "M", "61": "F", "7": "unknown"}


def test_every_subset_when_list_empty_and_named_subsets(tmp_path):
    root = copy_corpus(tmp_path, speakers=["1688", "1998"], utts_per_speaker=2)
    shutil.copytree(root / SUBSET / "1998", root / "dev-other" / "1998")
    shutil.rmtree(root / SUBSET / "1998")
    rows, _ = scan(root)
    assert {(r.subset, r.speaker) for r in rows} == {(SUBSET, "1688"), ("dev-other", "1998")}
    rows, _ = scan(root, subsets=["dev-other"])
    assert {r.subset for r in rows} == {"dev-other"} and len(rows) == 2


@pytest.mark.parametrize("case", ["missing_root", "missing_subset", "empty_subset", "no_speakers_txt",
                                  "nothing_usable"])
def test_bad_roots_raise_data_error_naming_the_path(tmp_path, case):
    root = copy_corpus(tmp_path, speakers=["1688"], utts_per_speaker=1)
    subsets, expect = [], str(root)
    if case == "missing_root":
        root, expect = tmp_path / "nope", str(tmp_path / "nope")
    elif case == "missing_subset":
        subsets, expect = ["train-clean-100"], str(root / "train-clean-100")
    elif case == "empty_subset":
        (root / "dev-clean").mkdir()
        subsets, expect = ["dev-clean"], str(root / "dev-clean")
    elif case == "no_speakers_txt":
        (root / "SPEAKERS.TXT").unlink()
        expect = str(root / "SPEAKERS.TXT")
    else:
        for f in root.rglob("*.flac"):
            f.write_bytes(b"not audio at all")
    with pytest.raises(DataError) as err:
        scan(root, subsets)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_scan_workers_do_not_change_the_result(bundled_copy):
    assert scan(bundled_copy, workers=1) == scan(bundled_copy, workers=8)


@pytest.mark.parametrize("orig", [8000, 11025, 22050, 24000, 44100, 48000, 16000])
def test_resampled_length_equals_torchaudio(orig):
    for n in [399, 8001, int(np.random.default_rng(orig).integers(1, 60000))]:
        assert resampled_length(int(n), orig, 16000) == AF.resample(torch.zeros(int(n)), orig, 16000).shape[0]


def test_resampled_length_follows_torchaudio_rounding_for_long_files():
    # ceil(160 * 441328 / 441) is 160120 in exact arithmetic; torchaudio (float32 ceil) keeps 160119.
    n = 441328
    assert resampled_length(n, 44100, 16000) == AF.resample(torch.zeros(n), 44100, 16000).shape[0] == 160119


def test_load_audio_mixes_channels_and_errors(tmp_path):
    left = np.sin(np.linspace(0, 200, 16000)).astype(np.float32) * 0.5
    sf.write(tmp_path / "st.flac", np.stack([left, np.zeros_like(left)], 1), 16000, subtype="PCM_24")
    wav = load_audio(tmp_path / "st.flac", 16000)
    assert torch.allclose(wav, torch.from_numpy(left) / 2, atol=1e-5)
    assert probe_audio(tmp_path / "st.flac").channels == 2
    (tmp_path / "bad.flac").write_bytes(b"\x00" * 100)
    for fn in (lambda p: load_audio(p, 16000), probe_audio):
        with pytest.raises(DataError, match="bad.flac"):
            fn(tmp_path / "bad.flac")


@pytest.mark.parametrize("rate, channels", [(8000, 2), (22050, 1)])
def test_load_audio_resamples_like_torchaudio_functional(tmp_path, rate, channels):
    data = np.random.default_rng(rate).uniform(-0.5, 0.5, (rate // 2, channels)).astype(np.float32)
    sf.write(tmp_path / "a.wav", data, rate, subtype="FLOAT")
    expected = AF.resample(torch.from_numpy(data.mean(axis=1)), rate, 16000)
    for _ in range(2):  # the second call reuses the cached kernel
        assert torch.equal(load_audio(tmp_path / "a.wav", 16000), expected)
