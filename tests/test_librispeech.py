"""Corpus scanning (fedhubert/librispeech.py) and audio loading (fedhubert/audio.py)."""

from __future__ import annotations

import logging
import os
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


def scan(root, subsets=(SUBSET,), workers=4, sample_rate=16000, min_samples=400, **kwargs):
    return scan_corpus(root, list(subsets), sample_rate, min_samples, workers, **kwargs)


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
    rows, rejects = scan(dirty_corpus, require_transcripts=True)
    reasons = {r.utt_id: r.reason for r in rejects}
    assert set(reasons) == set(BAD_FILES.values())
    assert "not readable audio" in reasons[BAD_FILES["corrupt"]]
    assert "empty file" in reasons[BAD_FILES["empty"]]
    assert "no transcript line" in reasons[BAD_FILES["untranscribed"]]
    assert "data.require_transcripts" in reasons[BAD_FILES["untranscribed"]]
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


def test_untranscribed_audio_is_kept_unless_transcripts_are_required(dirty_corpus, caplog):
    caplog.set_level(logging.INFO)
    rows, rejects = scan(dirty_corpus)
    assert {r.utt_id for r in rejects} == set(BAD_FILES.values()) - {BAD_FILES["untranscribed"]}
    (kept,) = [r for r in rows if r.utt_id == BAD_FILES["untranscribed"]]
    assert kept.transcript == "" and kept.speaker == "1998" and kept.sex == read_speakers(dirty_corpus)["1998"]
    assert all(r.transcript for r in rows if r is not kept)
    assert f"1 of {len(rows)} utterances kept without a transcript" in caplog.text
    # a chapter folder without any .trans.txt: its correctly named files are kept too
    for trans in (dirty_corpus / SUBSET / "2033").rglob("*.trans.txt"):
        trans.unlink()
    rows, _ = scan(dirty_corpus)
    assert sum(not r.transcript for r in rows) == 1 + sum(r.speaker == "2033" for r in rows) > 2
    _, rejects = scan(dirty_corpus, require_transcripts=True)
    assert sum("no transcript line" in r.reason for r in rejects) == 1 + 5  # 4 copied + the 8 kHz stereo file


def test_default_subsets_leave_out_evaluation_sets_and_named_ones_warn(tmp_path, caplog):
    root = copy_corpus(tmp_path, speakers=["1688", "1998", "2033"], utts_per_speaker=2)
    (root / "train-clean-100").mkdir()
    (root / SUBSET / "1688").rename(root / "train-clean-100" / "1688")
    (root / "dev-clean").mkdir()
    (root / SUBSET / "1998").rename(root / "dev-clean" / "1998")
    caplog.set_level(logging.INFO)
    rows_default, _ = scan(root, subsets=[])
    assert {(r.subset, r.speaker) for r in rows_default} == {("train-clean-100", "1688")}
    assert "left out dev-clean, test-other" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    rows, _ = scan(root, subsets=["train-clean-100", SUBSET])
    assert {(r.subset, r.speaker) for r in rows} == {("train-clean-100", "1688"), (SUBSET, "2033")}
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "data.subsets names test-other" in warning.message and "leaks test speech" in warning.message
    client = root / "client_0"  # a client folder (prepare_client.py --out) or any folder without audio
    client.mkdir()
    (client / "train.tsv").write_text("..\n")
    caplog.clear()
    assert scan(root, subsets=[])[0] == rows_default
    assert "left out client_0 under" in caplog.text
    with pytest.raises(DataError, match=r"subset folder .*client_0 holds no .*\(data.subsets\)"):
        scan(root, subsets=["client_0"])
    shutil.rmtree(client)
    shutil.rmtree(root / "train-clean-100")  # only evaluation sets left: the default scans nothing
    with pytest.raises(DataError, match=r"no training subset folders .*\(dev-clean, test-other\).*data.subsets"):
        scan(root, subsets=[])


LIBRI_LIGHT_BOOKS = {  # speaker -> book folder, as Libri-Light names them
    "1688": "sea_fairies_0812_librivox_64kb_mp3", "1998": "emma_0903_librivox_64kb_mp3",
    "2033": "sea_fairies_0812_librivox_64kb_mp3"}  # the same book read by two speakers


def libri_light_tree(tmp_path, per_speaker: int = 2):
    """A Libri-Light-shaped root: small/<speaker>/<book>/<name>.flac, no transcripts, no SPEAKERS.TXT."""
    root = tmp_path / "librilight"
    for spk, book in LIBRI_LIGHT_BOOKS.items():
        folder = root / "small" / spk / book
        folder.mkdir(parents=True)
        for j, src in enumerate(sorted((BUNDLED / SUBSET / spk).rglob("*.flac"))[:per_speaker]):
            shutil.copy(src, folder / f"{j:02d}_{book.split('_')[0]}_64kb_{j}.flac")
            (folder / f"{j:02d}_{book.split('_')[0]}_64kb_{j}.json").write_text('{"speaker": "%s"}' % spk)
    return root


def test_libri_light_layout(tmp_path, caplog):
    root = libri_light_tree(tmp_path)
    caplog.set_level(logging.INFO)
    rows, rejects = scan(root, subsets=[])
    assert not rejects and len(rows) == 6
    assert {r.speaker for r in rows} == set(LIBRI_LIGHT_BOOKS) and {r.sex for r in rows} == {"unknown"}
    assert len({r.utt_id for r in rows}) == 6  # 1688's and 2033's files share names in the same book
    r = rows[0]
    assert (r.subset, r.chapter, r.transcript) == ("small", LIBRI_LIGHT_BOOKS[r.speaker], "")
    assert r.utt_id == r.path.removesuffix(".flac") == f"small/{r.speaker}/{r.chapter}/00_sea_64kb_0"
    assert str(root / "SPEAKERS.TXT") in caplog.text and "sex is 'unknown'" in caplog.text
    assert "6 of 6 utterances kept without a transcript" in caplog.text
    with pytest.raises(DataError, match="no usable audio"):
        scan(root, subsets=[], require_transcripts=True)


def test_a_librispeech_named_file_must_sit_in_its_folders(tmp_path):
    """A file named <spk>-<chapter>-<utt> is a LibriSpeech file: it must sit in <spk>/<chapter>/, and
    its folder is a LibriSpeech chapter (every other name there is misnamed), also among Libri-Light files."""
    root = copy_corpus(tmp_path / "ls", speakers=["1688", "1998"], utts_per_speaker=1)
    (chapter,) = (root / SUBSET / "1998").iterdir()
    shutil.copy(next((root / SUBSET / "1688").rglob("*.flac")), chapter / "1688-142285-0500.flac")
    rows, rejects = scan(root)
    assert len(rows) == 2 and [r.utt_id for r in rejects] == ["1688-142285-0500"]
    root = libri_light_tree(tmp_path / "ll")
    folder = root / "small" / "1998" / LIBRI_LIGHT_BOOKS["1998"]
    shutil.copy(next(folder.glob("*.flac")), folder / "1998-1234-0001.flac")
    rows, rejects = scan(root, subsets=[])
    assert len(rows) == 4 and {r.path.rsplit("/", 2)[1] for r in rejects} == {folder.name} and len(rejects) == 3
    assert all("<spk>-<chapter>-<utt>" in r.reason for r in rejects)


@pytest.mark.parametrize("case", ["missing_root", "missing_subset", "empty_subset", "root_one_level_up",
                                  "root_one_level_down", "nothing_usable"])
def test_bad_roots_raise_data_error_naming_the_path(tmp_path, case):
    root = copy_corpus(tmp_path, speakers=["1688"], utts_per_speaker=1)
    subsets, expect = [SUBSET], str(root)
    if case == "missing_root":
        root, expect = tmp_path / "nope", str(tmp_path / "nope")
    elif case == "missing_subset":
        subsets, expect = ["train-clean-100"], str(root / "train-clean-100")
    elif case == "empty_subset":
        (root / "dev-clean").mkdir()
        subsets, expect = ["dev-clean"], str(root / "dev-clean")
    elif case in ("root_one_level_up", "root_one_level_down"):  # and no SPEAKERS.TXT there
        root = root.parent if case == "root_one_level_up" else root / SUBSET
        subsets, expect = [], "data.librispeech_root"
    else:
        for f in root.rglob("*.flac"):
            f.write_bytes(b"not audio at all")
    with pytest.raises(DataError) as err:
        scan(root, subsets)
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert case not in ("root_one_level_up", "root_one_level_down") or str(root) in str(err.value)


def test_missing_speakers_txt_is_a_warning(tmp_path, caplog):
    root = copy_corpus(tmp_path, speakers=["1688"], utts_per_speaker=2)
    (root / "SPEAKERS.TXT").unlink()
    caplog.set_level(logging.WARNING)
    rows, _ = scan(root)
    assert len(rows) == 2 and {r.sex for r in rows} == {"unknown"}
    assert str(root / "SPEAKERS.TXT") in caplog.text and "speakers missing from" not in caplog.text


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


def test_listing_follows_folder_links_and_rejects_dangling_files(tmp_path, monkeypatch):
    """The scan lists folders itself (os.scandir, not pathlib's glob): a speaker folder that is a symlink is
    followed, a dangling .flac link is a reject with its reason, a chapter's second .trans.txt is read,
    and each file is opened once (its first bytes say "empty" and give a FLAC's length)."""
    root = copy_corpus(tmp_path / "LS", utts_per_speaker=2)
    speakers = sorted(p.name for p in (root / SUBSET).iterdir())
    moved = shutil.move(str(root / SUBSET / speakers[0]), str(tmp_path / "elsewhere"))
    (root / SUBSET / speakers[0]).symlink_to(moved, target_is_directory=True)
    chapter = next((root / SUBSET / speakers[1]).iterdir())
    first = sorted(chapter.glob("*.flac"))[0]
    extra = chapter / f"{speakers[1]}-{chapter.name}-9999.flac"
    shutil.copy(first, extra)
    (chapter / "more.trans.txt").write_text(f"{extra.stem} A SECOND TRANSCRIPT FILE\n")
    (chapter / f"{speakers[1]}-{chapter.name}-0404.flac").symlink_to(tmp_path / "gone.flac")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(os.fspath(path)), real_open(path, *a, **k))[1])
    rows, rejects = scan(root)
    by_id = {r.utt_id: r for r in rows}
    assert len(rows) == 2 * len(speakers) + 1 and all(by_id[r.utt_id].speaker == r.speaker for r in rows)
    assert sum(r.speaker == speakers[0] for r in rows) == 2
    assert by_id[extra.stem].transcript == "A SECOND TRANSCRIPT FILE"
    assert [(r.utt_id, r.reason) for r in rejects] == [(f"{speakers[1]}-{chapter.name}-0404",
                                                         "cannot read file (No such file or directory)")]
    flac_opens = [p for p in opened if p.endswith(".flac")]
    assert len(flac_opens) == len(set(flac_opens)) == len(rows) + 1


def test_header_reads_stay_in_one_thread_until_they_wait_on_the_storage(monkeypatch):
    """Cached headers are read by the calling thread (threads only pass Python's lock around); once a
    batch waits on the storage (wall time over twice its CPU time), the rest goes to the pool and overlaps.
    The clocks are the test's own, so a busy machine cannot make a CPU-bound batch look like a wait."""
    import threading
    import types

    from fedhubert import librispeech
    from fedhubert.librispeech import _BATCH, Reject, read_headers

    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(librispeech, "time", types.SimpleNamespace(perf_counter=lambda: clock["wall"],
                                                                   thread_time=lambda: clock["cpu"]))

    def run(wait: float, workers: int = 4) -> list[int]:
        threads: list[int] = []

        def measure(i: int) -> Reject:
            threads.append(threading.get_ident())
            clock["cpu"] += 1e-5  # a cached header's CPU time ...
            clock["wall"] += 1e-5 + wait  # ... and the time spent waiting for the storage
            return Reject(f"{i:05d}", str(i), "test")
        _, rejects = read_headers(measure, list(range(4 * _BATCH)), workers=workers)
        assert [r.utt_id for r in rejects] == [str(i) for i in range(4 * _BATCH)]
        return threads

    here = threading.get_ident()
    assert set(run(0.0)) == {here}
    assert set(run(1e-3, workers=1)) == {here}
    waiting = run(1e-3)
    assert set(waiting[:_BATCH]) == {here} and here not in waiting[_BATCH:]
