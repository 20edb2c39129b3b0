"""partition_data.py's package function: client assignment, valid splits and the written outputs."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import BAD_FILES, BUNDLED, STEREO_8K, SUBSET, copy_corpus
from fedhubert.config import FRAME_LENGTH
from fedhubert.errors import ConfigError, DataError
from fedhubert.librispeech import Utterance
from fedhubert.partition import assign_clients, partition_corpus, speaker_based, split_valid


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def client_rows(out: Path, k: int, split: str | None = None) -> list[dict]:
    splits = [split] if split else ["train", "valid"]
    return [r for s in splits for r in read_csv(out / f"client_{k}" / f"{s}.csv")]


def fake_rows(hours_per_speaker: dict[str, list[float]]) -> list[Utterance]:
    """Manifest rows with given utterance durations (hours) per speaker."""
    rows = []
    for spk, hours in hours_per_speaker.items():
        for j, h in enumerate(hours):
            n = int(h * 3600 * 16000)
            rows.append(Utterance(f"{spk}-1-{j:04d}", spk, "F", "1", "s", f"s/{spk}/1/{spk}-1-{j:04d}.flac",
                                  16000, n, 1, 16000, n, h * 3600, "X"))
    return rows


def test_lpt_balances_hours_exactly_when_possible():
    rows = fake_rows({"a": [4, 3], "b": [6], "c": [5], "d": [4], "e": [3], "f": [2]})  # 7,6,5,4,3,2 h
    clients = speaker_based(rows, 3)
    loads = sorted(sum(rows[i].duration for i in idx) / 3600 for idx in clients)
    assert loads == pytest.approx([9, 9, 9])
    # Longest speaker first, to the emptiest client: a (7 h) and f (2 h) share a client.
    owner = {rows[i].speaker: k for k, idx in enumerate(clients) for i in idx}
    assert owner["a"] == owner["f"] and owner["b"] == owner["e"] and owner["c"] == owner["d"]


def test_speaker_based_on_bundled_corpus(bundled_copy, tmp_path, config_for):
    out = tmp_path / "parts"
    summary = partition_corpus(config_for(bundled_copy, out, "partition.num_clients=3"))
    manifest = read_csv(out / "manifest.csv")
    owners: dict[str, set[int]] = defaultdict(set)
    seen = []
    for k in range(3):
        for r in client_rows(out, k):
            owners[r["speaker"]].add(k)
            seen.append(r["utt_id"])
    assert all(len(ks) == 1 for ks in owners.values()) and len(owners) == 10
    assert sorted(seen) == sorted(r["utt_id"] for r in manifest)  # every utterance, exactly once
    # LPT bound: the most and least loaded clients differ by at most the longest speaker.
    spk_hours = defaultdict(float)
    for r in manifest:
        spk_hours[r["speaker"]] += float(r["duration"]) / 3600
    loads = [c["hours"] for c in summary["clients"]]
    assert max(loads) - min(loads) <= max(spk_hours.values()) + 1e-3
    assert summary["method"] == "speaker_based" and summary["seed"] == 42 and summary["utterances"] == 100
    for c in summary["clients"]:
        assert sum(c["speakers_by_sex"].values()) == c["speakers"]
        assert sum(c["hours_by_sex"].values()) == pytest.approx(c["hours"], abs=1e-3)


def test_outputs_and_tsv_format(dirty_corpus, tmp_path, config_for):
    out = tmp_path / "parts"
    partition_corpus(config_for(dirty_corpus, out, "partition.num_clients=2"))
    for name in ("manifest.csv", "rejects.csv", "summary.json", "summary.png"):
        assert (out / name).is_file(), name
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    untranscribed = BAD_FILES["untranscribed"]  # kept by default: pretraining needs no transcript
    assert {r["utt_id"] for r in read_csv(out / "rejects.csv")} == set(BAD_FILES.values()) - {untranscribed}
    assert all(r["reason"] for r in read_csv(out / "rejects.csv"))
    assert [r["utt_id"] for r in read_csv(out / "manifest.csv") if not r["transcript"]] == [untranscribed]
    assert json.loads((out / "summary.json").read_text())["untranscribed"] == 1
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    manifest = {r["path"]: r for r in read_csv(out / "manifest.csv")}
    assert STEREO_8K in {r["utt_id"] for r in manifest.values()}
    for k in range(2):
        for split in ("train", "valid"):
            lines = (out / f"client_{k}" / f"{split}.tsv").read_text().splitlines()
            root = Path(lines[0])
            assert root.is_absolute() and root == dirty_corpus.resolve()
            rich = client_rows(out, k, split)
            assert len(lines) - 1 == len(rich)
            for line, r in zip(lines[1:], rich):
                rel, n = line.split("\t")
                assert (root / rel).is_file() and int(n) >= FRAME_LENGTH
                assert rel == r["path"] and int(n) == int(manifest[rel]["num_samples"])
    stereo = next(r for r in manifest.values() if r["utt_id"] == STEREO_8K)
    assert int(stereo["num_samples"]) == 2 * int(stereo["orig_num_samples"])  # 8 kHz -> 16 kHz


def test_require_transcripts_rejects_untranscribed_audio(dirty_corpus, tmp_path, config_for):
    out = tmp_path / "parts"
    cfg = config_for(dirty_corpus, out, "partition.num_clients=2", "data.require_transcripts=true")
    summary = partition_corpus(cfg)
    reasons = {r["utt_id"]: r["reason"] for r in read_csv(out / "rejects.csv")}
    assert set(reasons) == set(BAD_FILES.values()) and summary["untranscribed"] == 0
    assert reasons[BAD_FILES["untranscribed"]].startswith("no transcript line")
    assert all(r["transcript"] for r in read_csv(out / "manifest.csv"))


def test_libri_light_tree_partitions_by_speaker(tmp_path, config_for):
    root = tmp_path / "librilight"
    books = {"1688": "sea_fairies_0812_librivox_64kb_mp3", "1998": "emma_0903_librivox_64kb_mp3",
             "2033": "sea_fairies_0812_librivox_64kb_mp3", "2414": "ozma_of_oz_1004_librivox_64kb_mp3"}
    for spk, book in books.items():  # Libri-Light: small/<speaker>/<book>/<name>.flac, nothing else
        (root / "small" / spk / book).mkdir(parents=True)
        for j, src in enumerate(sorted((BUNDLED / SUBSET / spk).rglob("*.flac"))[:3]):
            shutil.copy(src, root / "small" / spk / book / f"{j:02d}_{book[:4]}_64kb_{j}.flac")
    out = tmp_path / "p"
    summary = partition_corpus(config_for(root, out, "data.subsets=[]", "partition.num_clients=4"))
    assert (summary["speakers"], summary["utterances"], summary["untranscribed"]) == (4, 12, 12)
    assert summary["subsets"] == ["small"] and summary["rejected"] == 0
    owners = defaultdict(set)
    for k in range(4):
        for r in client_rows(out, k):
            owners[r["speaker"]].add(k)
            assert r["path"].startswith(f"small/{r['speaker']}/{books[r['speaker']]}/") and r["sex"] == "unknown"
    assert set(owners) == set(books) and sorted(min(v) for v in owners.values()) == [0, 1, 2, 3]
    assert all(len(v) == 1 for v in owners.values())


def test_valid_split_rules():
    rows = fake_rows({"a": [0.01] * 7, "b": [0.01] * 5, "c": [0.01] * 3})
    idx = list(range(len(rows)))
    for fraction, expected in [(0.1, 2), (0.0, 1), (0.5, 8), (0.9, 14)]:
        train, valid = split_valid(rows, idx, fraction, np.random.default_rng(0))
        assert len(valid) == expected and sorted(train + valid) == idx and not set(train) & set(valid)
    # 3 valid utterances out of 3 speakers: one per speaker.
    _, valid = split_valid(rows, idx, 0.2, np.random.default_rng(1))
    assert sorted(rows[i].speaker for i in valid) == ["a", "b", "c"]
    assert split_valid(rows, [0], 0.5, np.random.default_rng(0)) == ([0], [])
    assert split_valid(rows, [0, 1], 0.1, np.random.default_rng(0))[1] != []


def test_valid_holds_own_speakers(bundled_copy, tmp_path, config_for):
    out = tmp_path / "p"
    partition_corpus(config_for(bundled_copy, out, "partition.valid_fraction=0.2"))
    for k in range(3):
        train, valid = client_rows(out, k, "train"), client_rows(out, k, "valid")
        assert len(valid) == round(0.2 * (len(train) + len(valid)))
        assert {r["speaker"] for r in valid} <= {r["speaker"] for r in train}


def test_same_seed_same_bytes_and_seed_matters(bundled_copy, tmp_path, config_for):
    def run(out, *extra):
        partition_corpus(config_for(bundled_copy, out, "partition.method=iid", *extra))
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tsv"))}
    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a == b and len(a) == 7  # 3 clients x (train, valid) + heldout.tsv
    assert run(tmp_path / "c", "seed=7") != a


def test_heldout_utterances_leave_every_speaker_some_training_speech(bundled_copy, tmp_path, config_for):
    out = tmp_path / "p"
    summary = partition_corpus(config_for(bundled_copy, out, "partition.heldout_per_speaker=9"))
    held = list(csv.DictReader(open(out / "heldout.csv")))
    assert len(held) == summary["heldout_utterances"] == 10 * 9  # 9 of 10 per speaker: one stays
    in_clients = [r for k in range(3) for split in ("train", "valid") for r in client_rows(out, k, split)]
    assert {r["speaker"] for r in in_clients} == {r["speaker"] for r in held}
    assert not {r["utt_id"] for r in held} & {r["utt_id"] for r in in_clients}


def test_iid_spreads_speakers_and_balances_counts(bundled_copy, tmp_path, config_for):
    out = tmp_path / "p"
    partition_corpus(config_for(bundled_copy, out, "partition.method=iid", "partition.num_clients=4"))
    sizes = [len(client_rows(out, k)) for k in range(4)]
    assert sum(sizes) == 100 and max(sizes) - min(sizes) <= 1
    spread = {r["speaker"] for k in range(4) for r in client_rows(out, k)
              if sum(r["speaker"] == q["speaker"] for q in client_rows(out, (k + 1) % 4))}
    assert spread  # speakers shared between clients, unlike speaker_based


def test_dirichlet_alpha_controls_skew(bundled_copy, tmp_path, config_for):
    def clients_per_speaker(alpha: float) -> float:
        out = tmp_path / f"d{alpha}"
        summary = partition_corpus(config_for(bundled_copy, out, "partition.method=dirichlet",
                                              "partition.num_clients=4", f"partition.dirichlet_alpha={alpha}"))
        assert summary["dirichlet_alpha"] == alpha and all(c["utterances"] for c in summary["clients"])
        owners = defaultdict(set)
        for k in range(4):
            for r in client_rows(out, k):
                owners[r["speaker"]].add(k)
        assert sum(c["utterances"] for c in summary["clients"]) == 100
        return float(np.mean([len(v) for v in owners.values()]))
    assert clients_per_speaker(0.1) < clients_per_speaker(100.0)


def test_dirichlet_impossible_is_a_config_error():
    rows = fake_rows({"a": [0.01] * 3})
    from fedhubert.config import Config
    cfg = Config()
    cfg.partition.method, cfg.partition.num_clients, cfg.partition.dirichlet_alpha = "dirichlet", 3, 1e-6
    with pytest.raises(ConfigError, match="partition.dirichlet_alpha"):
        assign_clients(rows, cfg)


def test_too_many_clients_fails_before_writing(bundled_copy, tmp_path, config_for):
    out = tmp_path / "p"
    with pytest.raises(ConfigError, match=r"partition.num_clients \(11\).*10\b"):
        partition_corpus(config_for(bundled_copy, out, "partition.num_clients=11"))
    assert not out.exists()
    with pytest.raises(ConfigError, match="partition.num_clients"):
        partition_corpus(config_for(bundled_copy, out, "partition.method=iid", "partition.num_clients=101"))
    assert not out.exists()


def test_failed_run_leaves_previous_partition_untouched(tmp_path, config_for):
    root = copy_corpus(tmp_path, speakers=["1688", "1998", "2033"], utts_per_speaker=2)
    out = tmp_path / "p"
    partition_corpus(config_for(root, out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".png"}
    for f in (root / "test-other").rglob("*.flac"):
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no usable audio"):
        partition_corpus(config_for(root, out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".png"} == before


def test_stale_clients_and_targets_are_removed(bundled_copy, tmp_path, config_for):
    out = tmp_path / "p"
    partition_corpus(config_for(bundled_copy, out, "partition.num_clients=4"))
    for k in range(4):
        for name in ("train.km", "valid.km", "kmeans.joblib"):
            (out / f"client_{k}" / name).write_text("old")
    shared = ("targets.json", "codebook.npy", "kmeans_metrics.jsonl")  # a federated codebook's files
    for name in shared:
        (out / name).write_text("old")
    partition_corpus(config_for(bundled_copy, out, "partition.num_clients=4"))  # same partition
    assert (out / "client_0" / "train.km").read_text() == "old"  # still valid: kept
    assert all((out / name).read_text() == "old" for name in shared)
    (out / "client_notes").mkdir()  # not a client folder: left alone
    partition_corpus(config_for(bundled_copy, out, "partition.num_clients=3"))
    assert sorted(p.name for p in out.glob("client_*")) == ["client_0", "client_1", "client_2", "client_notes"]
    assert not list(out.rglob("*.km")) and not list(out.rglob("kmeans.joblib"))
    assert not any((out / name).exists() for name in shared)  # a codebook of clients that are gone
    assert json.loads((out / "summary.json").read_text())["num_clients"] == 3


def test_synthetic_espeak_speakers_five_clients(espeak_corpus, tmp_path, config_for):
    root, speakers = espeak_corpus
    out = tmp_path / "p"
    summary = partition_corpus(config_for(root, out, "partition.num_clients=5", "data.subsets=[]"))
    assert summary["speakers"] == len(speakers) >= 12 and summary["rejected"] == 0
    owners = defaultdict(set)
    for k in range(5):
        for r in client_rows(out, k):
            owners[r["speaker"]].add(k)
            assert r["sex"] in ("F", "M")
    assert set(owners) == set(speakers) and all(len(v) == 1 for v in owners.values())
    loads = [c["hours"] for c in summary["clients"]]
    longest = max(sum(float(r["duration"]) for r in read_csv(out / "manifest.csv") if r["speaker"] == s)
                  for s in speakers) / 3600
    assert max(loads) - min(loads) <= longest + 1e-3
    assert all(c["valid"]["utterances"] >= 1 for c in summary["clients"])
    sexes = {s for c in summary["clients"] for s in c["speakers_by_sex"]}
    assert sexes == {"F", "M"}


def test_partitions_dir_that_is_a_file(bundled_copy, tmp_path, config_for):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="data.partitions_dir"):
        partition_corpus(config_for(bundled_copy, tmp_path / "f"))
