"""prepare_client.py: a client machine makes its own client folder from its own audio (a LibriSpeech root,
or a folder of audio files with a speaker rule), with an audio root relative to the folder, so that the
folder can move with its audio; --audio-root points it at audio that moved on its own."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import BUNDLED, REPO, SUBSET, TINY, copy_corpus, make_config
from fedhubert.audio import resampled_length
from fedhubert.client_prep import NO_MATCH, prepare_client, rewrite_audio_root
from fedhubert.config import NUM_SPECIAL_SYMBOLS
from fedhubert.data import check_client_data, make_loader, read_manifest
from fedhubert.errors import ConfigError, DataError

LOCAL = [*TINY, "partition.num_clients=2"]  # TINY: per-client k-means (kmeans.codebook=local), 20 clusters
K = 20
SRC = BUNDLED / SUBSET


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plain_folder(dest: Path) -> Path:
    """``<speaker>/.../<name>`` audio without transcripts, under names LibriSpeech never uses: alice (3 .flac
    in a sub-folder), bob (2 .flac and an 8 kHz stereo .wav), and files that must be rejected: a file outside
    any speaker folder, a 0-byte file, a too-short .wav; a .txt that is not audio at all."""
    (dest / "alice" / "book1").mkdir(parents=True)
    (dest / "bob").mkdir()
    for j, src in enumerate(sorted((SRC / "2033" / "164914").glob("*.flac"))[:3]):
        shutil.copy(src, dest / "alice" / "book1" / f"take{j}.flac")
    bob = sorted((SRC / "2414" / "128291").glob("*.flac"))
    for j, src in enumerate(bob[:2]):
        shutil.copy(src, dest / "bob" / f"morning {j}.flac")
    wav, rate = sf.read(bob[2], dtype="float32")
    sf.write(dest / "bob" / "evening.wav", np.stack([wav[::2], 0.5 * wav[::2]], axis=1), rate // 2)
    shutil.copy(bob[0], dest / "loose.flac")
    (dest / "bob" / "empty.flac").write_bytes(b"")
    sf.write(dest / "bob" / "short.wav", wav[:300], rate)
    (dest / "bob" / "notes.txt").write_text("not audio\n")
    return dest


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Two client folders made by prepare_client.py from two separate audio folders, no shared corpus:
    ``parts/client_0`` from a LibriSpeech root (2 speakers x 3), ``parts/client_1`` from a plain folder;
    both with per-client k-means targets. Read-only by convention: copy to change."""
    site = tmp_path_factory.mktemp("site")
    libri = copy_corpus(site / "audio_a", speakers=["1688", "1998"], utts_per_speaker=3)
    plain = plain_folder(site / "audio_b")
    cfg = make_config(site / "nowhere", site / "parts", *LOCAL)
    prepare_client(cfg, libri, site / "parts" / "client_0")
    prepare_client(cfg, plain, site / "parts" / "client_1")
    return site


def client_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_librispeech_root_gives_what_partition_data_gives(site, tmp_path):
    from fedhubert.partition import partition_corpus
    from fedhubert.targets import generate_targets

    libri, client = site / "audio_a" / "LibriSpeech", site / "parts" / "client_0"
    cfg = make_config(libri, tmp_path / "parts", *TINY, "partition.num_clients=1", *(
        f"federation.min_{what}_clients=1" for what in ("fit", "evaluate", "available")))
    partition_corpus(cfg)
    generate_targets(cfg)
    simulated = tmp_path / "parts" / "client_0"
    assert client_files(simulated) <= client_files(client)  # every file a simulated client has, and
    assert {"rejects.csv", "summary.json"} <= client_files(client)  # what partition_data.py keeps beside them
    rows = {s: read_csv(client / f"{s}.csv") for s in ("train", "valid")}
    simulated_rows = [r for s in ("train", "valid") for r in read_csv(simulated / f"{s}.csv")]
    assert sorted(r["path"] for s in rows for r in rows[s]) == sorted(r["path"] for r in simulated_rows)
    assert len(rows["train"]) == 5 and len(rows["valid"]) == 1  # valid_fraction 0.1 of 6, at least one
    assert {r["speaker"] for s in rows for r in rows[s]} == {"1688", "1998"}
    for split in ("train", "valid"):
        root_line = (client / f"{split}.tsv").read_text().splitlines()[0]
        assert root_line == os.path.relpath(libri, client) and not Path(root_line).is_absolute()
        root, paths, _ = read_manifest(client / f"{split}.tsv")
        assert root == libri.resolve() and paths == [r["path"] for r in rows[split]]
        assert len((client / f"{split}.km").read_text().splitlines()) == len(paths)
    check_client_data(client, K)
    assert read_csv(client / "rejects.csv") == []


def test_a_plain_folder_with_the_default_speaker_rule(site):
    client = site / "parts" / "client_1"
    rows = read_csv(client / "train.csv") + read_csv(client / "valid.csv")
    assert sorted((r["speaker"], r["path"]) for r in rows) == [
        ("alice", f"alice/book1/take{j}.flac") for j in range(3)] + [
        ("bob", "bob/evening.wav"), ("bob", "bob/morning 0.flac"), ("bob", "bob/morning 1.flac")]
    assert {r["transcript"] for r in rows} == {""} and {r["sex"] for r in rows} == {"unknown"}
    wav = next(r for r in rows if r["path"] == "bob/evening.wav")
    assert (int(wav["orig_sample_rate"]), int(wav["channels"])) == (8000, 2)
    assert int(wav["num_samples"]) == resampled_length(int(wav["orig_num_samples"]), 8000, 16000)
    reasons = {r["path"]: r["reason"] for r in read_csv(client / "rejects.csv")}
    assert reasons["loose.flac"] == NO_MATCH and reasons["bob/empty.flac"] == "empty file (0 bytes)"
    assert reasons["bob/short.wav"].startswith("too short") and len(reasons) == 3  # notes.txt is no audio
    check_client_data(client, K)
    assert client_files(client) >= {"train.km", "valid.km", "kmeans.joblib", "summary.json"}


def test_a_custom_speaker_rule_and_a_federated_codebook_write_the_manifests_only(tmp_path, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for spk, chapter in (("1688", "142285"), ("1998", "15444")):
        for j, src in enumerate(sorted((SRC / spk / chapter).glob("*.flac"))[:2]):
            shutil.copy(src, flat / f"reader{spk}_{j}.flac")
    cfg = make_config(tmp_path / "nowhere", tmp_path / "parts", *LOCAL, "kmeans.codebook=federated")
    with pytest.raises(DataError, match="no usable audio under .*4 files rejected.*speaker rule did not match"):
        prepare_client(cfg, flat, tmp_path / "default_rule")  # no folder names a speaker here
    assert not (tmp_path / "default_rule").exists()
    with caplog.at_level(logging.INFO, logger="fedhubert.client_prep"):
        prepare_client(cfg, flat, tmp_path / "client", speaker_rule=r"^reader(\d+)_")
    rows = read_csv(tmp_path / "client" / "train.csv") + read_csv(tmp_path / "client" / "valid.csv")
    assert sorted(r["speaker"] for r in rows) == ["1688", "1688", "1998", "1998"]
    assert client_files(tmp_path / "client") == {"train.tsv", "valid.tsv", "train.csv", "valid.csv", "rejects.csv",
                                                 "summary.json"}  # the federated k-means labels it
    assert 'come from the federated k-means run (task="kmeans"' in caplog.text
    check_client_data(tmp_path / "client", None)


def test_a_client_folder_moved_with_its_audio_still_loads(site, tmp_path, monkeypatch):
    shutil.copytree(site, tmp_path / "data")
    shutil.move(tmp_path / "data", tmp_path / "elsewhere" / "data")  # the machine's whole data folder
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative root is relative to the .tsv, not to here
    cfg = make_config(Path("nowhere"), Path("data/parts"), *LOCAL)
    for k in range(2):
        client = Path("data/parts") / f"client_{k}"
        audio = ["audio_a/LibriSpeech", "audio_b"][k]  # the moved copy's audio, not the site's that is still there
        assert read_manifest(client / "train.tsv")[0] == (tmp_path / "elsewhere" / "data" / audio).resolve()
        check_client_data(client, K)
        batch = next(iter(make_loader(client, "train", cfg, batch_size=2, seed=0, train=True)))
        assert len(batch) == 2 and batch.target_ids.max() < K + NUM_SPECIAL_SYMBOLS


def test_audio_root_points_a_folder_at_audio_that_moved_alone(site, tmp_path):
    client = tmp_path / "client_1"
    shutil.copytree(site / "parts" / "client_1", client)
    shutil.copytree(site / "audio_b", tmp_path / "disk2" / "speech")
    with pytest.raises(DataError, match="not found"):  # its relative root leads nowhere from here
        check_client_data(client, K)
    before = {p.name: p.read_bytes() for p in client.glob("*.tsv")}
    (tmp_path / "disk2" / "speech" / "bob" / "morning 1.flac").unlink()
    with pytest.raises(DataError, match=r"speech/bob/morning 1\.flac not found \(listed in .*\.tsv:\d+\)"):
        rewrite_audio_root(client, tmp_path / "disk2" / "speech")
    assert {p.name: p.read_bytes() for p in client.glob("*.tsv")} == before  # nothing half-done
    shutil.copy(site / "audio_b" / "bob" / "morning 1.flac", tmp_path / "disk2" / "speech" / "bob")
    assert rewrite_audio_root(client, tmp_path / "disk2" / "speech") == sorted(client.glob("*.tsv"))
    for name, old in before.items():
        new = (client / name).read_text()
        assert new.splitlines()[0] == "../disk2/speech"
        assert new.partition("\n")[2] == old.decode().partition("\n")[2]  # only the root line changed
    check_client_data(client, K)


def test_audio_root_serves_a_copied_partition_data_folder(tmp_path):
    from fedhubert.partition import partition_corpus

    root = copy_corpus(tmp_path / "central", speakers=["1688", "1998"], utts_per_speaker=2)
    partition_corpus(make_config(root, tmp_path / "parts", "partition.num_clients=2"))
    assert Path((tmp_path / "parts" / "client_0" / "train.tsv").read_text().splitlines()[0]).is_absolute()
    shutil.copytree(tmp_path / "parts" / "client_0", tmp_path / "machine" / "client_0")
    shutil.move(tmp_path / "central", tmp_path / "machine" / "corpus")  # the central copy is gone
    with pytest.raises(DataError, match="not found"):
        check_client_data(tmp_path / "machine" / "client_0", None)
    rewrite_audio_root(tmp_path / "machine" / "client_0", tmp_path / "machine" / "corpus" / "LibriSpeech")
    check_client_data(tmp_path / "machine" / "client_0", None)
    assert (tmp_path / "machine" / "client_0" / "valid.tsv").read_text().startswith("../corpus/LibriSpeech\n")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prepare_client.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_bad_rule_or_a_missing_audio_folder_stops_before_writing(tmp_path):
    audio = plain_folder(tmp_path / "audio")
    done = run_cli("--audio", "audio", "--out", "client", "--speaker-rule", "(a)(b)", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --speaker-rule '(a)(b)' has 2 groups; it needs exactly one")
    cfg = make_config(tmp_path / "nowhere", tmp_path / "parts", *LOCAL)
    for rule in ("no group", "(unclosed"):
        with pytest.raises(ConfigError, match="--speaker-rule"):
            prepare_client(cfg, audio, tmp_path / "client", speaker_rule=rule)
    with pytest.raises(DataError, match=f"audio folder not found: {tmp_path / 'no_audio'} \\(--audio\\)"):
        prepare_client(cfg, tmp_path / "no_audio", tmp_path / "client")
    assert not (tmp_path / "client").exists()


def test_a_folder_of_another_clients_audio_is_refused_unless_overwrite(tmp_path):
    cfg = make_config(tmp_path / "nowhere", tmp_path / "parts", *LOCAL, "kmeans.codebook=federated")
    mine, other = plain_folder(tmp_path / "mine"), tmp_path / "other"
    shutil.copytree(mine / "alice", other / "carol")
    prepare_client(cfg, mine, tmp_path / "client")
    (tmp_path / "client" / "train.km").write_text("planted labels\n")  # as if the federated k-means ran
    prepare_client(cfg, mine, tmp_path / "client")  # the same audio again: fine, and its labels stay
    assert (tmp_path / "client" / "train.km").exists()
    (tmp_path / "client" / "kmeans.joblib").write_bytes(b"planted")  # ... but per-client labels are not its
    prepare_client(cfg, mine, tmp_path / "client")
    assert not (tmp_path / "client" / "train.km").exists() and not (tmp_path / "client" / "kmeans.joblib").exists()
    (tmp_path / "client" / "train.km").write_text("planted labels\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "client").iterdir()}
    with pytest.raises(DataError, match="train.tsv holds another client's manifest.*--overwrite"):
        prepare_client(cfg, other, tmp_path / "client")
    assert {p.name: p.read_bytes() for p in (tmp_path / "client").iterdir()} == before
    prepare_client(cfg, other, tmp_path / "client", overwrite=True)
    assert not (tmp_path / "client" / "train.km").exists()  # labels of other audio never survive
    assert {r["speaker"] for r in read_csv(tmp_path / "client" / "train.csv")} == {"carol"}


def test_the_simulation_accepts_prepared_client_folders(site):
    from fedhubert.federation.simulation import check_partitions

    check_partitions(make_config(site / "nowhere", site / "parts", *LOCAL))
    with pytest.raises(DataError, match="client_2.*missing"):  # it does look at the folders
        check_partitions(make_config(site / "nowhere", site / "parts", *TINY, "partition.num_clients=3"))
