"""generate_kmeans_targets.py's package function: MFCC frames, per-client k-means, .km files."""

from __future__ import annotations

import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans

from conftest import REPO, STEREO_8K, copy_corpus
from fedhubert.audio import load_audio
from fedhubert.config import Config, load_config, num_frames
from fedhubert.errors import ConfigError, DataError
from fedhubert.partition import partition_corpus
from fedhubert.features import MfccFeatures, single_torch_thread
from fedhubert.targets import cluster_count, generate_targets, parse_clients

# per-client MiniBatchKMeans (kmeans.codebook=federated is tests/test_kmeans_federated.py's)
FAST = ("kmeans.n_clusters=16", "kmeans.batch_size=1500", "kmeans.fit_passes=2", "kmeans.codebook=local")


def tsv_lines(path):
    lines = path.read_text().splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


@pytest.fixture
def partitioned(dirty_corpus, tmp_path, config_for):
    """The dirty corpus partitioned into 2 speaker-based clients; returns (cfg, out)."""
    out = tmp_path / "parts"
    cfg = config_for(dirty_corpus, out, "partition.num_clients=2", *FAST)
    partition_corpus(cfg)
    return cfg, out


def test_km_files_match_manifests_frame_for_frame(partitioned):
    cfg, out = partitioned
    infos = generate_targets(cfg)
    assert [i["client"] for i in infos] == [0, 1]
    stereo_seen = False
    for info in infos:
        d = out / f"client_{info['client']}"
        km = joblib.load(d / "kmeans.joblib")
        assert isinstance(km, MiniBatchKMeans) and km.n_clusters == info["n_clusters"] == 16
        for split in ("train", "valid"):
            root, entries = tsv_lines(d / f"{split}.tsv")
            labels = (d / f"{split}.km").read_text().splitlines()
            assert len(labels) == len(entries) > 0
            for (rel, n), line in zip(entries, labels):
                ids = [int(x) for x in line.split()]
                assert len(ids) == num_frames(int(n)) == (int(n) - 400) // 320 + 1
                assert 0 <= min(ids) and max(ids) < km.n_clusters
                stereo_seen |= STEREO_8K in rel
        # The stored model reproduces the written labels.
        root, entries = tsv_lines(d / "train.tsv")
        feats = MfccFeatures(cfg)(load_audio(f"{root}/{entries[0][0]}", 16000))
        first = [int(x) for x in (d / "train.km").read_text().splitlines()[0].split()]
        assert km.predict(feats).tolist() == first
    assert stereo_seen
    assert not list(out.rglob("*.tmp"))


def test_same_seed_same_labels(partitioned, tmp_path, dirty_corpus, config_for):
    cfg, out = partitioned
    generate_targets(cfg)
    first = (out / "client_0" / "train.km").read_bytes()
    generate_targets(cfg, "0")
    assert (out / "client_0" / "train.km").read_bytes() == first
    other = config_for(dirty_corpus, out, "partition.num_clients=2", *FAST, "seed=1")
    partition_corpus(other)
    generate_targets(other, "0")
    assert (out / "client_0" / "train.km").read_bytes() != first


def test_cluster_count_rule(partitioned):
    cfg, out = partitioned
    assert cluster_count(10_000, cfg, "c") == 16  # min(n_clusters, 10000 // 20)
    cfg.kmeans.n_clusters = 500
    assert cluster_count(10_000, cfg, "c") == 500 and cluster_count(2_000, cfg, "c") == 100
    assert cluster_count(40, cfg, "c") == 2
    with pytest.raises(DataError, match="client_7.*kmeans.min_frames_per_cluster"):
        cluster_count(39, cfg, "client_7")
    # End to end: a small client gets train_frames // min_frames_per_cluster clusters.
    cfg.kmeans.min_frames_per_cluster = 400
    (info,) = generate_targets(cfg, "1")
    assert info["n_clusters"] == min(500, info["train_frames"] // 400) < 500
    assert joblib.load(out / "client_1" / "kmeans.joblib").n_clusters == info["n_clusters"]


def test_client_with_too_few_frames_is_an_error(partitioned):
    cfg, out = partitioned
    cfg.kmeans.min_frames_per_cluster = 10**6
    with pytest.raises(DataError, match="client_0"):
        generate_targets(cfg)
    assert not list(out.rglob("*.km")) and not list(out.rglob("*.joblib"))


@pytest.mark.parametrize("deltas", [True, False])
def test_mfcc_frames_equal_num_frames(deltas):
    cfg = Config()
    cfg.kmeans.use_deltas = deltas
    features = MfccFeatures(cfg)
    lengths = [400, 401, 719, 720, 721, 16000, *np.random.default_rng(0).integers(400, 50_000, 6)]
    with single_torch_thread():
        feats_of = [(int(n), features(torch.randn(int(n)))) for n in lengths]
    for n, feats in feats_of:
        assert feats.shape == (num_frames(n), 39 if deltas else 13) and feats.dtype == np.float32
        assert np.isfinite(feats).all()


def test_streaming_fit_feeds_chunks_of_batch_size(partitioned, monkeypatch):
    cfg, out = partitioned
    sizes = []
    real = MiniBatchKMeans.partial_fit

    def spy(self, X, *args, **kwargs):
        sizes.append(len(X))
        return real(self, X, *args, **kwargs)
    monkeypatch.setattr(MiniBatchKMeans, "partial_fit", spy)
    (info,) = generate_targets(cfg, "0")
    frames, bs = info["train_frames"], 1500
    per_pass = [bs] * (frames // bs) + ([frames % bs] if frames % bs else [])
    assert sizes == per_pass * cfg.kmeans.fit_passes


def test_stale_manifest_raises_and_writes_nothing(partitioned):
    cfg, out = partitioned
    tsv = out / "client_1" / "valid.tsv"
    lines = tsv.read_text().splitlines()
    rel, n = lines[1].split("\t")
    lines[1] = f"{rel}\t{int(n) + 320}"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rel.rsplit("/", 1)[-1]) as err:
        generate_targets(cfg)
    assert "valid.tsv" in str(err.value)
    assert (out / "client_0" / "train.km").is_file()  # client 0 finished before client 1 failed
    assert not any((out / "client_1" / name).exists() for name in ("train.km", "valid.km", "kmeans.joblib"))
    assert not list(out.rglob("*.tmp"))


def test_client_selection_and_config_checks(partitioned):
    cfg, out = partitioned
    assert parse_clients(None, 3) == [0, 1, 2] and parse_clients("2, 0", 3) == [0, 2]
    for bad in ("3", "a", "", "-1"):
        with pytest.raises(ConfigError, match="--clients"):
            parse_clients(bad, 3)
    generate_targets(cfg, "1")
    assert (out / "client_1" / "train.km").is_file() and not (out / "client_0" / "train.km").exists()
    cfg.partition.num_clients = 3
    with pytest.raises(ConfigError, match="partition.num_clients"):
        generate_targets(cfg)
    cfg.partition.num_clients, cfg.data.sample_rate = 2, 8000
    with pytest.raises(ConfigError, match="data.sample_rate"):
        generate_targets(cfg)
    cfg.data.sample_rate, cfg.kmeans.n_mfcc, cfg.kmeans.n_mels = 16000, 20, 10
    with pytest.raises(ConfigError, match="kmeans.n_mfcc"):
        generate_targets(cfg)
    cfg.data.partitions_dir = str(out / "nowhere")
    with pytest.raises(DataError, match="partition_data.py"):
        generate_targets(cfg)


def test_scripts_end_to_end(tmp_path):
    """Both CLIs with --set overrides, as a user runs them; then a bad flag exits 2 with one line."""
    root = copy_corpus(tmp_path, speakers=["1688", "1998", "2033"], utts_per_speaker=3)
    sets = [f"--set=data.librispeech_root={root}", f"--set=data.partitions_dir={tmp_path / 'p'}",
            "--set=data.subsets=[test-other]", "--set=partition.num_clients=3", "--set=kmeans.n_clusters=8"]
    for script in ("partition_data.py", "generate_kmeans_targets.py"):
        done = subprocess.run([sys.executable, script, "--config", "configs/pretraining_config.yaml", *sets],
                              cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    cfg = load_config(REPO / "configs/pretraining_config.yaml", [s.removeprefix("--set=") for s in sets])
    for k in range(3):
        for split in ("train", "valid"):
            _, entries = tsv_lines(tmp_path / "p" / f"client_{k}" / f"{split}.tsv")
            labels = (tmp_path / "p" / f"client_{k}" / f"{split}.km").read_text().splitlines()
            assert [len(l.split()) for l in labels] == [num_frames(int(n)) for _, n in entries]
    assert cfg.partition.num_clients == 3


def test_truncated_audio_fails_clearly_without_output(partitioned):
    """A header that promises more than the file holds passes the scan; decoding must name it."""
    cfg, out = partitioned
    rel = (out / "client_0" / "train.tsv").read_text().splitlines()[2].split("\t")[0]
    path = cfg.data.librispeech_root + "/" + rel
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match=rel.rsplit("/", 1)[-1]) as err:
        generate_targets(cfg, "0")
    assert "train.tsv" in str(err.value) and "\n" not in str(err.value)
    assert "partition_data.py" in str(err.value) and "prepare_client.py" in str(err.value)  # both ways to rebuild
    assert not any((out / "client_0" / n).exists() for n in ("train.km", "valid.km", "kmeans.joblib"))
