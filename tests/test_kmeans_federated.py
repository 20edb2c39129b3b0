"""kmeans.codebook=federated: federated k-means as a Flower simulation (federation/kmeans_app.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, app_for_ray_workers, make_config
from fedhubert import fedkmeans
from fedhubert.config import load_config, num_frames
from fedhubert.data import read_manifest
from fedhubert.errors import ConfigError
from fedhubert.partition import SPLITS
from fedhubert.features import MfccFeatures, single_torch_thread
from fedhubert.targets import SplitFrames, generate_targets

K, D = 20, 39  # TINY's kmeans.n_clusters; 13 MFCC + deltas + delta-deltas


@pytest.fixture
def parts(federated_partitions, tmp_path):
    """A writable copy of the shared tiny federation's partitions (its .km files are per-client k-means)."""
    root, shared = federated_partitions
    shutil.copytree(shared, tmp_path / "partitions")
    return root, tmp_path / "partitions"


def kmeans_config(parts, *overrides):
    return make_config(*parts, *TINY, "kmeans.codebook=federated", *overrides)


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "kmeans_metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def faulty_kmeans_app(monkeypatch):
    return app_for_ray_workers(monkeypatch, "faulty_kmeans_clients")


def test_one_codebook_labels_every_client_despite_failed_and_nan_clients(parts, monkeypatch, faulty_kmeans_app):
    """One simulation (a Ray start is the cost here): client 0 raises in round 1 and client 1 sends NaN
    sums in round 2 (faulty_kmeans_clients.py); both are left out of that round, every later round has all
    three, and every client labels its splits with the one codebook. Malformed replies of every kind, in
    process: test_faults_kmeans.py."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedhubert.federation.simulation import run_federated_kmeans

    shapes: list[tuple[str, str, tuple]] = []  # every array any client sent, seen on the server's side
    send_and_receive = InMemoryGrid.send_and_receive

    def spy(self, messages, *args, **kwargs):
        replies = list(send_and_receive(self, messages, *args, **kwargs))
        for reply in replies:
            if not reply.has_error():
                assert all(np.isscalar(v) for r in reply.content.metric_records.values() for v in r.values())
                shapes.extend((reply.metadata.message_type, name, tuple(a.shape))
                              for record in reply.content.array_records.values() for name, a in record.items())
        return replies

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", spy)
    _, out = parts
    cfg = kmeans_config(parts, "kmeans.max_rounds=6", "kmeans.tol=0")
    result = run_federated_kmeans(cfg, client_app=faulty_kmeans_app)
    infos = result["clients"]

    codebook = np.load(out / "codebook.npy")
    assert codebook.shape == (K, D) and np.isfinite(codebook).all()
    assert sorted(i["client"] for i in infos) == [0, 1, 2] and {i["n_clusters"] for i in infos} == {K}
    features = MfccFeatures(cfg)
    min_frames = min(i["train_frames"] for i in infos)
    with single_torch_thread():
        for k in range(3):
            d = out / f"client_{k}"
            assert not (d / "kmeans.joblib").exists()  # the per-client model of the fixture's local run
            for split in SPLITS:
                frames = SplitFrames(d / f"{split}.tsv", features, cfg.data.sample_rate)
                lines = (d / f"{split}.km").read_text().splitlines()
                assert len(lines) == len(frames) == len(read_manifest(d / f"{split}.tsv")[1]) > 0
                for i, line in enumerate(lines):  # relabelled here with the shared codebook: the same ids
                    ids = np.array(line.split(), dtype=np.int64)
                    assert len(ids) == num_frames(frames.sizes[i])
                    np.testing.assert_array_equal(ids, fedkmeans.assign(codebook, frames.utterance(i)))

    rounds = history(out)
    assert [r["round"] for r in rounds] == list(range(7)) and rounds[0]["local_centres"] <= 3 * K
    assert [(r["clients_ok"], r["clients_failed"]) for r in rounds] == [(3, 0), (2, 1), (2, 1)] + [(3, 0)] * 4
    assert "0" not in rounds[1]["bytes_up_per_client"] and "planted failure" in rounds[1]["failures"][0]
    assert re.search(r"client 1: .*NaN", rounds[2]["failures"][0]) and "1" not in rounds[2]["bytes_up_per_client"]
    # Lloyd's inertia never rises once every client answers (from round 3, the first update on all three)
    inertia = [r["inertia"] for r in rounds[3:]]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(inertia, inertia[1:])), inertia
    for r in rounds[1:]:
        assert r["clusters_used"] <= K
        assert r["bytes_up_per_client"] == {str(k): fedkmeans.message_bytes(K, D) for k in range(3)
                                            if str(k) in r["bytes_up_per_client"]}
        assert r["bytes_up_total"] == r["clients_ok"] * fedkmeans.message_bytes(K, D)
    # Nothing frame-sized left a client: k-FED centres (at most k_local = K rows) and K-sized statistics.
    assert {t for t, _, _ in shapes} == {"train.kmeans_init", "train.kmeans_stats"}
    assert max(shape[0] for _, _, shape in shapes) <= K < min_frames
    assert {name for _, name, _ in shapes} == {"centres", "counts", "sums", "inertia", "num_frames"}


@pytest.mark.parametrize("override, key", [("kmeans.codebook=foo", "kmeans.codebook"),
                                           ("kmeans.update=adam", "kmeans.update"),
                                           ("kmeans.k_local=-1", "kmeans.k_local"),
                                           ("kmeans.max_rounds=0", "kmeans.max_rounds")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(None, [override])


def test_config_checks_before_any_simulation(parts):
    with pytest.raises(ConfigError, match="kmeans.k_local"):  # 3 clients x 5 centres cannot seed 20 clusters
        kmeans_config(parts, "kmeans.k_local=5")
    with pytest.raises(ConfigError, match="--clients"):  # one codebook needs every client
        generate_targets(kmeans_config(parts), "0")
    assert not (parts[1] / "codebook.npy").exists()
