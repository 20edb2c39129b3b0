"""fedhubert.fedkmeans: federated k-means (k-FED init, pooled Lloyd/mini-batch steps) on synthetic blobs."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from sklearn.cluster import KMeans

from fedhubert.errors import FederationError
from fedhubert.fedkmeans import (ClusterStats, assign, client_stats, converged, fit_federated, initial_codebook,
                                 lloyd_update, local_centres, message_bytes, minibatch_update)

K, D = 6, 4


@pytest.fixture(scope="module")
def blobs():
    """Three non-IID clients over 6 overlapping Gaussian blobs: client c holds mostly blobs 2c and 2c+1."""
    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, (K, D))
    clients = []
    for c, n in enumerate((1500, 1200, 900)):  # unequal sizes: pooled means must weight by counts
        w = np.full(K, 0.04)
        w[2 * c] = w[2 * c + 1] = 0.4
        labels = rng.choice(K, n, p=w / w.sum())
        clients.append(means[labels] + rng.normal(0, 1.0, (n, D)))
    return clients


def chunked(x, rows=500):
    """A client callable: yields its frames in chunks, afresh on each call."""
    return lambda: (x[i:i + rows] for i in range(0, len(x), rows))


def kfed_init(clients, k=K, seed=0):
    return initial_codebook([local_centres(x, 2, seed=i)[0] for i, x in enumerate(clients)], k, seed)


@pytest.mark.parametrize("rounds", [1, 2, 6])
def test_federated_lloyd_equals_sklearn_on_pooled_data(blobs, rounds):
    init = kfed_init(blobs)
    pooled = np.concatenate(blobs)
    km = KMeans(n_clusters=K, init=init, n_init=1, max_iter=rounds, tol=0, algorithm="lloyd").fit(pooled)
    codebook, history = fit_federated([chunked(x) for x in blobs], K, k_local=2, max_rounds=rounds, tol=0.0,
                                      seed=0, init=init)
    assert len(history) == rounds and all(h["clusters_used"] == K and not h["reseeded"] for h in history)
    assert np.abs(codebook - init).max() > 0.1  # the rounds did move the centroids
    np.testing.assert_allclose(codebook, km.cluster_centers_, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(assign(codebook, pooled), km.predict(pooled))
    # The inertia reported for a round is that of the codebook going into it.
    np.testing.assert_allclose(history[0]["inertia"], ((pooled - init[assign(init, pooled)]) ** 2).sum())


def test_driver_kfed_init_is_the_pooled_local_centres_seeding(blobs):
    _, history = fit_federated([chunked(x) for x in blobs], K, k_local=2, max_rounds=1, tol=0.0, seed=0)
    init = kfed_init(blobs)
    pooled = np.concatenate(blobs)
    np.testing.assert_allclose(history[0]["inertia"], ((pooled - init[assign(init, pooled)]) ** 2).sum())


def test_clients_send_only_k_sized_aggregates(blobs):
    x = blobs[0]
    codebook = kfed_init(blobs)
    stats = client_stats(codebook, chunked(x)())
    assert [f.name for f in dataclasses.fields(ClusterStats)] == ["sums", "counts", "inertia", "num_frames"]
    assert stats.sums.shape == (K, D) and stats.sums.dtype == np.float64
    assert stats.counts.shape == (K,) and stats.counts.dtype == np.int64
    assert isinstance(stats.inertia, float) and stats.num_frames == len(x) == stats.counts.sum()
    arrays = [v for v in vars(stats).values() if isinstance(v, np.ndarray)]
    assert arrays and all(len(a) != len(x) for a in arrays)  # no per-frame array travels
    centres, counts = local_centres(x, 3, seed=1)
    assert centres.shape == (3, D) and centres.dtype == np.float32 and counts.sum() == len(x)
    # Reported upload: float32 sums + int64 counts + inertia + num_frames.
    assert message_bytes(K, D) == 4 * K * D + 8 * K + 16


def test_kfed_init_picks_distinct_pooled_centres_deterministically(blobs):
    locals_ = [local_centres(x, 3, seed=i)[0] for i, x in enumerate(blobs)]
    pooled = np.concatenate(locals_).astype(np.float64)
    a = initial_codebook(locals_, 5, seed=7)
    assert a.shape == (5, D) and len(np.unique(a, axis=0)) == 5
    assert all((np.abs(pooled - row).max(1) == 0).any() for row in a)  # every pick is a pooled centre
    np.testing.assert_array_equal(a, initial_codebook(locals_, 5, seed=7))
    assert any(not np.array_equal(a, initial_codebook(locals_, 5, seed=s)) for s in range(8, 12))
    # Asking for every distinct centre returns all of them, even with duplicates in the pool.
    everything = initial_codebook(locals_ + [locals_[0]], 9, seed=0)
    assert sorted(map(tuple, everything)) == sorted(map(tuple, pooled))
    with pytest.raises(ValueError, match=r"only 9 distinct .* k=10: lower k"):
        initial_codebook(locals_ + [locals_[0]], 10, seed=0)


def test_local_centres_never_duplicate_when_a_client_has_few_distinct_frames():
    frames = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)
    centres, counts = local_centres(frames, 8, seed=0)
    assert len(centres) == 3 and len(np.unique(centres, axis=0)) == 3 and counts.tolist() == [5, 5, 5]


def test_empty_cluster_is_reseeded_without_frames(blobs):
    pooled = np.concatenate(blobs)
    codebook = kfed_init(blobs, k=5)
    codebook = np.vstack([codebook, np.full(D, 1e3)])  # far away: gets no frame
    stats = client_stats(codebook, [pooled])
    assert stats.counts[5] == 0
    new, info = lloyd_update(codebook, stats, seed=3)
    assert info["reseeded"] == [5] and info["clusters_used"] == 5
    donor = info["donors"][0]
    assert donor == int(stats.counts.argmax())
    assert np.isfinite(new).all() and not np.allclose(new[5], codebook[5])
    # Split of the biggest cluster: close to the donor, but distinct from it.
    offset = np.linalg.norm(new[5] - new[donor])
    np.testing.assert_allclose(offset, 0.1 * np.sqrt(stats.inertia / stats.num_frames))
    np.testing.assert_array_equal(new, lloyd_update(codebook, stats, seed=3)[0])  # deterministic
    # The next round actually uses the re-seeded cluster.
    assert client_stats(new, [pooled]).counts[5] > 0


def test_several_empty_clusters_split_different_donors(blobs):
    pooled = np.concatenate(blobs)
    codebook = np.vstack([kfed_init(blobs, k=4), np.full((2, D), 1e3) + np.arange(2)[:, None]])
    new, info = lloyd_update(codebook, client_stats(codebook, [pooled]), seed=0)
    assert info["reseeded"] == [4, 5] and len(set(info["donors"])) == 2 and np.isfinite(new).all()


def test_minibatch_converges_near_lloyd(blobs):
    init = kfed_init(blobs)
    clients = [chunked(x) for x in blobs]
    exact, _ = fit_federated(clients, K, k_local=2, max_rounds=30, tol=1e-9, seed=0, init=init)
    mb, history = fit_federated(clients, K, k_local=2, max_rounds=30, tol=0.0, seed=0, init=init,
                                update="minibatch", sample_clients=0.67)
    assert all(len(h["clients"]) == 2 for h in history)
    assert np.abs(mb - exact).max() < 0.3
    assert np.abs(init - exact).max() > 1.0  # the loose tolerance still tells the two apart


def test_minibatch_update_rule():
    codebook = np.array([[0.0, 0.0], [10.0, 10.0]])
    stats = ClusterStats(np.array([[6.0, 3.0], [0.0, 0.0]]), np.array([3, 0]), 1.0, 3)
    new, running = minibatch_update(codebook, np.array([1, 4]), stats)
    # c <- c + (sum - n c) / (N + n): (0 + 6/4, 0 + 3/4); the empty cluster keeps its centroid.
    np.testing.assert_allclose(new, [[1.5, 0.75], [10.0, 10.0]])
    assert running.tolist() == [4, 4]


def test_failed_client_is_left_out_and_round_goes_on(blobs, caplog):
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:  # init, round 1 fine; fails in round 2
            raise OSError("disk gone")
        return chunked(blobs[1])()

    clients = [chunked(blobs[0]), flaky, chunked(blobs[2])]
    with caplog.at_level(logging.WARNING, logger="fedhubert.fedkmeans"):
        codebook, history = fit_federated(clients, K, k_local=2, max_rounds=3, tol=0.0, seed=0)
    assert [h["failed"] for h in history] == [[], [1], []]
    assert history[1]["clients"] == [0, 2] and set(history[1]["bytes_up"]) == {0, 2}
    assert history[0]["bytes_up"] == {i: message_bytes(K, D) for i in range(3)}
    assert "client 1 failed during round 2" in caplog.text and "disk gone" in caplog.text
    assert np.isfinite(codebook).all()


def test_all_clients_failing_raises(blobs):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(FederationError, match="initialisation"):
        fit_federated([broken, broken], K, k_local=2, max_rounds=2, tol=0.0, seed=0)
    with pytest.raises(FederationError, match="round 1: all 2 sampled clients failed"):
        fit_federated([broken, broken], K, k_local=2, max_rounds=2, tol=0.0, seed=0, init=kfed_init(blobs))


def test_streaming_equals_one_call(blobs):
    x = np.concatenate(blobs)
    codebook = kfed_init(blobs)
    whole = client_stats(codebook, [x])
    streamed = client_stats(codebook, (x[i:i + 317] for i in range(0, len(x), 317)))
    np.testing.assert_allclose(streamed.sums, whole.sums, rtol=1e-12)
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    np.testing.assert_allclose(streamed.inertia, whole.inertia, rtol=1e-12)
    assert streamed.num_frames == whole.num_frames == len(x)
    # Per-client statistics add up to the pooled ones.
    parts = [client_stats(codebook, [b]) for b in blobs]
    merged = parts[0] + parts[1] + parts[2]
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-12)
    # Chunking inside add() (smaller than the data) gives the same labels.
    small = ClusterStats.zeros(K, D).add(codebook, x, chunk_rows=64)
    np.testing.assert_array_equal(small.counts, whole.counts)
    np.testing.assert_array_equal(assign(codebook, x, chunk_rows=64), assign(codebook, x))


def test_converged():
    assert not converged(None, 1.0, 0.1)
    assert converged(100.0, 99.95, 1e-3) and not converged(100.0, 99.0, 1e-3)
    assert not converged(100.0, 100.0, 0.0)  # tol=0 runs every round


def test_driver_stops_on_tolerance(blobs):
    _, history = fit_federated([chunked(x) for x in blobs], K, k_local=2, max_rounds=50, tol=1e-6, seed=0)
    assert 2 <= len(history) < 50
    last, before = history[-1]["inertia"], history[-2]["inertia"]
    assert abs(before - last) / before < 1e-6
