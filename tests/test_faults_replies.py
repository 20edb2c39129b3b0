"""Faults of issue 11 in the pretraining strategy's replies, without a simulation: malformed client replies,
stragglers and late replies against the strategy (Flower Messages built here, a fake Grid: fake_grid.py),
and against the ServerApp's round loop. The k-means replies: test_faults_kmeans.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from conftest import fed_config
from fake_grid import (Clients, FakeGrid, npy, read_jsonl, run, server_cfg, with_array, with_metrics, with_record,
                       without_array, without_record)
from fedhubert.federation.strategy import make_strategy
from fedhubert.federation.task import decode_arrays, encode_arrays

# --- malformed replies -----------------------------------------------------------------------------------

SHAPES = {"w": (4, 3), "b": (5,)}
NODES = [11, 12, 13, 14]  # partition k is node NODES[k]; client 3 is the faulty one
STRATEGIES = [("fedavg", "mean"), ("fedadam", "mean"), ("fedadam", "median")]
TIMEOUT = 30.0


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def configured(strategy: str, aggregation: str):
    """(strategy, round 1's train messages by partition) after configure_train on the four nodes."""
    cfg = fed_config(("/x", "/y"), "/z", f"federation.strategy={strategy}", f"federation.aggregation={aggregation}",
                     "federation.min_fit_clients=3", f"federation.round_timeout={TIMEOUT}")
    ours = make_strategy(cfg)
    record = ArrayRecord({k: Array(v) for k, v in global_arrays().items()})
    messages = ours.configure_train(1, record, ConfigRecord(), FakeGrid(NODES))
    return ours, sorted(messages, key=lambda m: NODES.index(m.metadata.dst_node_id))


def honest(msg: Message, pid: int, shift: float | None = None) -> Message:
    """What our ClientApp sends: the weights it received moved by ``shift`` (default 0.01 (pid + 1)),
    in the wire dtype, with num-examples, partition-id and a loss."""
    sent = decode_arrays(msg.content["arrays"])
    trained = {k: v + (0.01 * (pid + 1) if shift is None else shift) for k, v in sent.items()}
    metrics = {"loss": 1.0 + pid, "num-examples": 10 * (pid + 1), "partition-id": pid}
    content = RecordDict({"arrays": encode_arrays(trained, "float32"), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


FLOAT32_W = 4 * 3 * 4  # bytes of "w"
# (case, how client 3's reply is changed, who the failure names, a part of its reason)
MALFORMED = [
    ("renamed array", lambda c: (without_array("w")(c), with_array("w2", np.zeros((4, 3), np.float32))(c)),
     "client 3", "missing 'w'; unexpected 'w2'"),
    ("missing array", without_array("b"), "client 3", "missing 'b'"),
    ("extra huge array", with_array("extra", np.zeros(4_000_000, np.float32)), "client 3", "unexpected 'extra'"),
    ("wrong shape", with_array("w", np.zeros((3, 4), np.float32)), "client 3",
     "array 'w' has shape (3, 4), expected (4, 3)"),
    ("float64", with_array("w", np.zeros((4, 3), np.float64)), "client 3", "array 'w' is float64, expected float32"),
    ("int32", with_array("b", np.zeros(5, np.int32)), "client 3", "array 'b' is int32, expected float32"),
    # Flower's metadata says (4, 3) float32, the .npy header inside the bytes says 2^40 floats (4 TiB):
    # np.load would allocate them before reading, so this must be refused from the header alone
    ("huge array behind a right label", with_array("w", Array("float32", (4, 3), "numpy.ndarray",
                                                              npy((2 ** 40,), "float32", b"\0" * 64))),
     "client 3", "array 'w' has shape (1099511627776,)"),
    ("byte-swapped data", with_array("w", Array("float32", (4, 3), "numpy.ndarray", npy((4, 3), ">f4", b"\0" * 48))),
     "client 3", "holds >f4 data"),
    ("truncated data", with_array("w", Array("float32", (4, 3), "numpy.ndarray", npy((4, 3), "float32", b"\0" * 8))),
     "client 3", f"holds 8 bytes of data, its shape needs {FLOAT32_W}"),
    ("not numpy", with_array("w", Array("float32", (4, 3), "torch.Tensor", b"\0" * FLOAT32_W)), "client 3",
     "serialised as 'torch.Tensor'"),
    ("no header", with_array("w", Array("float32", (4, 3), "numpy.ndarray", b"\0" * FLOAT32_W)), "client 3",
     "no readable .npy header"),
    ("NaN in the update", with_array("b", np.full(5, np.nan, np.float32)), "client 3", "update contains NaN/Inf"),
    ("no metrics record", without_record("metrics"), "node 14", "reply holds the records ['arrays']"),
    ("no arrays record", without_record("arrays"), "node 14", "reply holds the records ['metrics']"),
    ("an extra record", with_record("config", ConfigRecord({"x": 1})), "node 14", "reply holds the records"),
    ("metrics of the wrong kind", lambda c: (without_record("metrics")(c), with_record("metrics", ConfigRecord(
        {"partition-id": 3, "num-examples": 1}))(c)), "node 14", "'metrics' is a ConfigRecord"),
    ("no partition-id", with_metrics(**{"partition-id": None}), "node 14", "no valid 'partition-id'"),
    ("negative partition-id", with_metrics(**{"partition-id": -1}), "node 14", "no valid 'partition-id'"),
    ("another client's partition-id", with_metrics(**{"partition-id": 0}), "node 14", "partition-id 0 already replied"),
    ("no num-examples", with_metrics(**{"num-examples": None}), "client 3", "metrics lack 'num-examples'"),
    ("zero num-examples", with_metrics(**{"num-examples": 0}), "client 3", "'num-examples' is 0: it must be positive"),
    ("negative num-examples", with_metrics(**{"num-examples": -50}), "client 3", "must be positive"),
    ("NaN metric", with_metrics(loss=float("nan")), "client 3", "metrics contain NaN/Inf ('loss' is nan)"),
    ("list metric", with_metrics(loss=[1.0, 2.0]), "client 3", "metric 'loss' is a list, not a number"),
    ("another metric name", with_metrics(extra=1.0), "client 3", "metric names differ from the other clients'"),
    ("a missing metric", with_metrics(loss=None), "client 3", "metric names differ from the other clients'"),
]


def reference(strategy: str, aggregation: str, good: int = 3) -> dict[str, np.ndarray]:
    """The same strategy's aggregate of the honest replies of clients 0 .. good - 1 alone."""
    ours, messages = configured(strategy, aggregation)
    arrays, _ = ours.aggregate_train(1, [honest(m, pid) for pid, m in enumerate(messages[:good])])
    return {k: a.numpy() for k, a in arrays.items()}


@pytest.mark.parametrize("strategy, aggregation", STRATEGIES)
@pytest.mark.parametrize("case, change, who, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_reply_is_left_out_and_the_round_goes_on(strategy, aggregation, case, change, who, reason):
    ours, messages = configured(strategy, aggregation)
    replies = [honest(m, pid) for pid, m in enumerate(messages)]
    change(replies[3].content)
    arrays, metrics = ours.aggregate_train(1, replies)
    report = ours.train_report
    assert report.succeeded == [0, 1, 2]
    assert len(report.failed) == 1 and report.failed[0][0] == who and reason in report.failed[0][1], report.failed
    assert report.sampled == len(report.succeeded) + len(report.failed) == 4
    expected = reference(strategy, aggregation)
    for key, value in expected.items():  # exactly the aggregate of the three good replies
        np.testing.assert_array_equal(arrays[key].numpy(), value)
        assert arrays[key].numpy().dtype == np.float32
    assert metrics["loss"] == pytest.approx((1 * 10 + 2 * 20 + 3 * 30) / 60)  # weighted by num-examples
    assert sorted(report.client_metrics) == [0, 1, 2]


@pytest.mark.parametrize("strategy, aggregation", STRATEGIES)
def test_too_few_good_replies_end_the_round_without_an_aggregate(strategy, aggregation):
    ours, messages = configured(strategy, aggregation)
    replies = [honest(m, pid) for pid, m in enumerate(messages)]
    with_array("w", np.zeros((3, 4), np.float32))(replies[0].content)
    with_metrics(**{"num-examples": None})(replies[1].content)
    replies[2] = Message(Error(code=0, reason="planted"), reply_to=messages[2])
    assert ours.aggregate_train(1, replies) == (None, None)  # min_fit_clients 3: the server stops the run
    assert [who for who, _ in ours.train_report.failed] == ["client 0", "client 1", "node 13"]


def test_malformed_evaluation_replies_are_left_out():
    cfg = fed_config(("/x", "/y"), "/z", "federation.min_evaluate_clients=2")
    ours = make_strategy(cfg)
    record = ArrayRecord({k: Array(v) for k, v in global_arrays().items()})
    messages = sorted(ours.configure_evaluate(2, record, ConfigRecord(), FakeGrid(NODES)),
                      key=lambda m: m.metadata.dst_node_id)

    def reply(msg: Message, pid: int, **metrics) -> Message:
        values = {"loss": 2.0 + pid, "num-examples": 5, "partition-id": pid, **metrics}
        return Message(RecordDict({"metrics": MetricRecord({k: v for k, v in values.items() if v is not None})}),
                       reply_to=msg)

    extra = RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 5, "partition-id": 3}),
                        "arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))})})
    replies = [reply(messages[0], 0), reply(messages[1], 1), reply(messages[2], 2, **{"num-examples": None}),
               Message(extra, reply_to=messages[3])]
    metrics = ours.aggregate_evaluate(2, replies)
    assert metrics["loss"] == pytest.approx(2.5)  # clients 0 and 1
    assert ours.evaluate_report.succeeded == [0, 1]
    assert ours.evaluate_report.failed == [("client 2", "metrics lack 'num-examples'"),
                                           ("node 14", "reply holds the records ['arrays', 'metrics'], expected "
                                                       "['metrics']")]


# --- stragglers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, aggregation", STRATEGIES)
def test_a_straggler_times_out_and_its_late_reply_is_never_aggregated(strategy, aggregation):
    ours, messages = configured(strategy, aggregation)
    late = honest(messages[3], 3, shift=1000.0)  # client 3 answers round 1 only after the server moved on
    arrays, _ = ours.aggregate_train(1, [honest(m, pid) for pid, m in enumerate(messages[:3])])
    report = ours.train_report
    assert report.succeeded == [0, 1, 2]
    assert report.failed == [("node 14", f"timeout: no reply within federation.round_timeout ({TIMEOUT:g} s)")]
    for key, value in reference(strategy, aggregation).items():
        np.testing.assert_array_equal(arrays[key].numpy(), value)

    # Round 2: everyone answers in time, and the straggler's round-1 reply turns up among the replies.
    new_global = {k: a.numpy() for k, a in arrays.items()}
    messages2 = sorted(ours.configure_train(2, ArrayRecord({k: Array(v) for k, v in new_global.items()}),
                                            ConfigRecord(), FakeGrid(NODES)),
                       key=lambda m: NODES.index(m.metadata.dst_node_id))
    arrays2, _ = ours.aggregate_train(2, [late] + [honest(m, pid) for pid, m in enumerate(messages2)])
    report = ours.train_report
    assert report.succeeded == [0, 1, 2, 3] and report.failed == []
    assert report.ignored == [("node 14", "late reply to the train message of round 1 (this is round 2's train): "
                                          "ignored")]
    assert all(np.abs(a.numpy()).max() < 100 for a in arrays2.values())  # the +1000 update never got in

    # The same late reply, now the only answer of node 14: ignored, and node 14 timed out again.
    messages3 = ours.configure_train(3, arrays2, ConfigRecord(), FakeGrid(NODES))
    by_node = {m.metadata.dst_node_id: m for m in messages3}
    ours.aggregate_train(3, [late] + [honest(by_node[n], pid) for pid, n in enumerate(NODES[:3])])
    assert [who for who, _ in ours.train_report.failed] == ["node 14"] and len(ours.train_report.ignored) == 1


def test_replies_to_the_wrong_step_or_from_unsampled_nodes_are_ignored():
    ours, messages = configured("fedavg", "mean")
    evaluation = ours.configure_evaluate(1, ArrayRecord({k: Array(v) for k, v in global_arrays().items()}),
                                         ConfigRecord(), FakeGrid(NODES))
    stray = Message(RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 1, "partition-id": 0})}),
                    reply_to=evaluation[0])  # an evaluation reply among the train replies
    replies = [honest(m, pid) for pid, m in enumerate(messages)] + [stray, honest(messages[0], 0)]
    unsampled = honest(messages[1], 1)
    unsampled.metadata.__dict__["_src_node_id"] = 99
    arrays, _ = ours.aggregate_train(1, replies + [unsampled])
    assert arrays is not None and ours.train_report.succeeded == [0, 1, 2, 3] and not ours.train_report.failed
    assert [reason.split(" (")[0].split(",")[0] for _, reason in ours.train_report.ignored] == [
        "late reply to the evaluate message of round 1", "second reply from node 11: ignored",
        "reply from node 99"]


def test_the_server_leaves_out_a_straggler_and_a_malformed_reply_and_ignores_the_late_reply(tmp_path):
    cfg = server_cfg(tmp_path, "federation.num_rounds=2")
    clients = Clients(faults={(1, 1): "straggle",
                              (2, 2): with_array("extra", np.zeros(4_000_000, np.float32))})
    result = run(cfg, clients)
    assert clients.grid.timeouts == [7.0] * 5  # every step waits federation.round_timeout, no longer
    history = read_jsonl(tmp_path / "ckpt" / "metrics.jsonl")
    assert [r["round"] for r in history] == [0, 1, 2] == [r["round"] for r in result["history"]]
    assert (history[1]["clients_succeeded"], history[1]["failures"]) == (
        2, ["node 22: timeout: no reply within federation.round_timeout (7 s)"])
    assert history[2]["clients_succeeded"] == 2 and history[2]["ignored"] == [
        "node 22: late reply to the train message of round 1 (this is round 2's train): ignored"]
    assert len(history[2]["failures"]) == 1 and history[2]["failures"][0].startswith(
        "client 2: arrays do not match the ") and "unexpected 'extra'" in history[2]["failures"][0]
    server = tmp_path / "ckpt" / "server"
    start = torch.load(server / "round_0.pt", weights_only=True)["model_weight"]
    final = torch.load(server / "round_2.pt", weights_only=True)["model_weight"]
    moved = max(float((final[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 0.01  # FedAvg of the 0.001 (k + 1) moves; the late +1000 never got in
