"""Faults of issue 11 in federated k-means's replies (kmeans_app.py), in-process: the k-means ServerApp on a
fake Grid whose clients (fake_grid.KmeansClients) answer as the ClientApp does, one of them malformed.
Every reply goes through replies.screen, as pretraining's do (test_faults_replies.py); the simulation
with real audio and a raising client is test_kmeans_federated.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord

from fake_grid import (KMEANS_DIM as D, KMEANS_NODES, npy, read_jsonl, run_kmeans, with_array, with_metrics,
                       with_record, without_array, without_record)
from fedhubert.errors import FederationError
from fedhubert.federation.kmeans_app import INIT, LABEL, STATS

K = 20   # TINY's kmeans.n_clusters (600 frames hold 30 clusters' worth: K stays 20)
BAD = 2  # the faulty client; node KMEANS_NODES[2]


def counts_with(value: int, fix_total: bool = True):
    """The stats reply's counts with cluster 0's set to ``value``; num_frames kept equal to their sum."""
    def change(content) -> None:
        counts = content["arrays"]["counts"].numpy().copy()
        counts[0] = value
        with_array("counts", counts)(content)
        if fix_total:
            with_array("num_frames", np.array([counts.sum()], np.int64))(content)
    return change


def init_counts(change_counts):
    def change(content) -> None:
        with_array("counts", change_counts(content["arrays"]["counts"].numpy().copy()))(content)
    return change


HUGE = 2 ** 40  # a header claiming 2^40 rows: 4 TiB or more, refused before anything is allocated
# (case, the step, how client 2's reply is changed, who the failure names, a part of its reason)
MALFORMED = [
    ("renamed array", STATS, lambda c: (without_array("sums")(c), with_array("total", np.zeros((K, D), np.float32))(c)),
     "client 2", "missing 'sums'; unexpected 'total'"),
    ("missing array", STATS, without_array("inertia"), "client 2", "missing 'inertia'"),
    ("extra huge array", STATS, with_array("extra", np.zeros(4_000_000, np.float32)), "client 2", "unexpected 'extra'"),
    ("wrong shape", STATS, with_array("sums", np.zeros((K, D + 1), np.float32)), "client 2",
     f"array 'sums' has shape ({K}, {D + 1}), expected ({K}, {D})"),
    ("float64 sums", STATS, with_array("sums", np.zeros((K, D), np.float64)), "client 2",
     "array 'sums' is float64, expected float32"),
    ("float counts", STATS, with_array("counts", np.zeros(K, np.float32)), "client 2",
     "array 'counts' is float32, expected int64"),
    ("huge array behind a right label", STATS,
     with_array("counts", Array("int64", (K,), "numpy.ndarray", npy((HUGE,), "int64", b"\0" * 64))),
     "client 2", f"array 'counts' has shape ({HUGE},)"),
    ("truncated data", STATS,
     with_array("sums", Array("float32", (K, D), "numpy.ndarray", npy((K, D), "float32", b"\0" * 8))),
     "client 2", f"holds 8 bytes of data, its shape needs {K * D * 4}"),
    ("NaN sums", STATS, with_array("sums", np.full((K, D), np.nan, np.float32)), "client 2",
     "statistics contain NaN/Inf"),
    ("Inf inertia", STATS, with_array("inertia", np.array([np.inf])), "client 2", "statistics contain NaN/Inf"),
    ("negative counts", STATS, counts_with(-5), "client 2", "negative statistics (counts down to -5"),
    ("negative inertia", STATS, with_array("inertia", np.array([-1.0])), "client 2", "inertia -1"),
    ("counts not adding up", STATS, counts_with(10 ** 6, fix_total=False), "client 2", "do not add up to num_frames"),
    ("no metrics record", STATS, without_record("metrics"), f"node {KMEANS_NODES[BAD]}",
     "reply holds the records ['arrays']"),
    ("no arrays record", STATS, without_record("arrays"), f"node {KMEANS_NODES[BAD]}",
     "reply holds the records ['metrics']"),
    ("an extra record", STATS, with_record("config", ConfigRecord({"x": 1})), f"node {KMEANS_NODES[BAD]}",
     "reply holds the records"),
    ("another client's partition-id", STATS, with_metrics(**{"partition-id": 0}), f"node {KMEANS_NODES[BAD]}",
     "partition-id 0 already replied"),
    ("no partition-id", STATS, with_metrics(**{"partition-id": None}), f"node {KMEANS_NODES[BAD]}",
     "no valid 'partition-id'"),
    ("NaN metric", STATS, with_metrics(loss=float("nan")), "client 2", "metrics contain NaN/Inf ('loss' is nan)"),
    ("the client raised", STATS, "raise", f"node {KMEANS_NODES[BAD]}", "client raised: RuntimeError: planted failure"),
    ("a straggler", STATS, "straggle", f"node {KMEANS_NODES[BAD]}",
     "timeout: no reply within federation.round_timeout (9 s)"),
    ("centres of another dim", INIT, with_array("centres", np.zeros((K, D + 1), np.float32)), "client 2",
     f"array 'centres' has shape ({K}, {D + 1}), expected (1..{K}, {D})"),
    ("more centres than k_local", INIT, lambda c: (with_array("centres", np.zeros((K + 1, D), np.float32))(c),
                                                   with_array("counts", np.ones(K + 1, np.int64))(c)),
     "client 2", f"array 'centres' has shape ({K + 1}, {D}), expected (1..{K}, {D})"),
    ("huge centres behind a right label", INIT,
     with_array("centres", Array("float32", (K, D), "numpy.ndarray", npy((HUGE, D), "float32", b"\0" * 64))),
     "client 2", f"array 'centres' has shape ({HUGE}, {D})"),
    ("NaN centres", INIT, with_array("centres", np.full((K, D), np.nan, np.float32)), "client 2",
     "local centres contain NaN/Inf"),
    ("negative centre counts", INIT, init_counts(lambda c: c - c.max() - 1), "client 2", "counts are negative"),
    ("fewer counts than centres", INIT, init_counts(lambda c: c[:-1]), "client 2",
     f"{K} local centres but {K - 1} counts"),
    ("negative num-frames", INIT, with_metrics(**{"num-frames": -5}), "client 2",
     "'num-frames' is -5: it must be a non-negative integer"),
    ("fractional num-frames", INIT, with_metrics(**{"num-frames": 1.5}), "client 2", "'num-frames' is 1.5"),
    ("no num-frames", INIT, with_metrics(**{"num-frames": None}), "client 2", "metrics lack 'num-frames'"),
]
ROUND = {INIT: 0, STATS: 1}  # the kmeans_metrics.jsonl line of each step


@pytest.fixture(scope="module")
def left_out(tmp_path_factory) -> dict[str, np.ndarray]:
    """Per step, the codebook of a run in which client 2 never answers that step: a malformed reply
    must leave exactly the same."""
    codebooks = {}
    for step in ROUND:
        out = tmp_path_factory.mktemp("reference")
        run_kmeans(out, {(step, ROUND[step], BAD): "straggle"})
        codebooks[step] = np.load(out / "codebook.npy")
    return codebooks


@pytest.mark.parametrize("case, step, change, who, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_kmeans_reply_is_left_out_and_the_step_goes_on(tmp_path, left_out, case, step, change, who,
                                                                   reason):
    result, _ = run_kmeans(tmp_path, {(step, ROUND[step], BAD): change})
    history = read_jsonl(tmp_path / "kmeans_metrics.jsonl")
    line = history[ROUND[step]]
    assert (line["clients_sampled"], line["clients_ok"], line["clients_failed"]) == (3, 2, 1)
    (failure,) = line["failures"]
    assert failure.startswith(f"{who}: ") and reason in failure, failure
    assert "\n" not in failure  # one line: a traceback's last line only
    assert str(BAD) not in line["bytes_up_per_client"]
    assert all(r["clients_ok"] == 3 for r in history if r is not line)  # only that step lost client 2
    np.testing.assert_array_equal(np.load(tmp_path / "codebook.npy"), left_out[step])  # the other two's alone
    assert [c["client"] for c in result["clients"]] == [0, 1, 2] and (tmp_path / "targets.json").is_file()


def test_a_late_kmeans_reply_is_ignored(tmp_path, left_out):
    """Client 2's round-1 statistics turn up in round 2: listed as ignored, never added in."""
    run_kmeans(tmp_path, {(STATS, 1, BAD): "late"})
    history = read_jsonl(tmp_path / "kmeans_metrics.jsonl")
    assert [(r["clients_ok"], r["clients_failed"]) for r in history] == [(3, 0), (2, 1), (3, 0)]
    assert history[2]["ignored"] == [f"node {KMEANS_NODES[BAD]}: late reply to the train.kmeans_stats message of "
                                     f"round 1 (this is round 2's train.kmeans_stats): ignored"]
    np.testing.assert_array_equal(np.load(tmp_path / "codebook.npy"), left_out[STATS])


def test_too_few_good_kmeans_replies_stop_the_run_in_one_line(tmp_path):
    faults = {(STATS, 2, 0): with_array("sums", np.zeros((K, D), np.float64)), (STATS, 2, 1): "raise"}
    with pytest.raises(FederationError) as raised:
        run_kmeans(tmp_path, faults)
    message = str(raised.value)
    assert message.startswith("k-means round 2: 1 of 3 clients succeeded, 2 needed (client 0: array 'sums' is float64")
    assert f"node {KMEANS_NODES[1]}: client raised: RuntimeError: planted failure); stopping" in message
    assert "\n" not in message
    assert [r["round"] for r in read_jsonl(tmp_path / "kmeans_metrics.jsonl")] == [0, 1]
    assert not (tmp_path / "codebook.npy").exists() and not (tmp_path / "targets.json").exists()


def test_labelling_needs_every_client(tmp_path):
    """Every client labels its own splits with the one codebook: one bad labelling reply stops the run
    before codebook.npy and targets.json say the targets are made."""
    with pytest.raises(FederationError, match=re.escape(
            "k-means labelling: 2 of 3 clients succeeded, 3 needed (client 2: 'train-utterances' is -1: it must be "
            "a non-negative integer); stopping")):
        run_kmeans(tmp_path, {(LABEL, 3, BAD): with_metrics(**{"train-utterances": -1})})
    assert not (tmp_path / "codebook.npy").exists() and not (tmp_path / "targets.json").exists()
