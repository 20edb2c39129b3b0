"""Faults of issue 11, each without a simulation: malformed client replies and stragglers against the
strategy (Flower Messages built here, a fake Grid), pickled payloads against every checkpoint loader, and
checkpoint writes cut short (a rename that never happens, a full disk, a SIGKILL) against --resume."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from conftest import REPO, fed_config
from fake_grid import FakeGrid
from fedhubert.errors import FederationError
from fedhubert.federation.rundir import round_files
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


def npy(shape: tuple[int, ...], dtype: str, data: bytes = b"") -> bytes:
    """A .npy header claiming ``shape`` and ``dtype``, followed by ``data``: what np.save writes, without
    the array."""
    handle = io.BytesIO()
    np.lib.format.write_array_header_1_0(handle, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": shape})
    return handle.getvalue() + data


def with_array(name: str, array: Array | np.ndarray):
    def change(content: RecordDict) -> None:
        arrays = dict(content["arrays"].items())
        arrays[name] = array if isinstance(array, Array) else Array(array)
        content["arrays"] = ArrayRecord(arrays)
    return change


def without_array(name: str):
    def change(content: RecordDict) -> None:
        content["arrays"] = ArrayRecord({k: a for k, a in content["arrays"].items() if k != name})
    return change


def with_metrics(**values):
    def change(content: RecordDict) -> None:
        metrics = {**dict(content["metrics"].items()), **values}
        content["metrics"] = MetricRecord({k: v for k, v in metrics.items() if v is not None})
    return change


def without_record(name: str):
    def change(content: RecordDict) -> None:
        del content[name]
    return change


def with_record(name: str, record):
    def change(content: RecordDict) -> None:
        content[name] = record
    return change


FLOAT32_W = 4 * 3 * 4  # bytes of "w"
# (case, how client 3's reply is changed, who the failure names, a part of its reason)
MALFORMED = [
    ("renamed array", lambda c: (without_array("w")(c), with_array("w2", np.zeros((4, 3), np.float32))(c)),
     "client 3", "missing 'w'; unexpected 'w2'"),
    ("missing array", without_array("b"), "client 3", "missing 'b'"),
    ("extra huge array", with_array("extra", np.zeros(4_000_000, np.float32)), "client 3", "unexpected 'extra'"),
    ("wrong shape", with_array("w", np.zeros((3, 4), np.float32)), "client 3",
     "array 'w' has shape (3, 4), the global array (4, 3)"),
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


# --- checkpoints holding pickled objects --------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it creates ``marker`` (torch's safe loader must never get that far)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class Settings:
    """A harmless class instance: still not plain data, so still refused."""

    def __init__(self) -> None:
        self.hidden_size = 32


def tiny_cfg(tmp_path: Path, *overrides: str):
    return fed_config((tmp_path / "corpus", tmp_path / "parts"), tmp_path / "ckpt", *overrides)


def write_payload(path: Path, kind: str, marker: Path) -> Path:
    """A checkpoint-looking file at ``path``: a real tiny checkpoint whose extras (or model_cfg) carry ``kind``."""
    from fedhubert.checkpoint import save_checkpoint
    from fedhubert.federation.task import build_model

    cfg = tiny_cfg(path.parent)
    save_checkpoint(path, build_model(cfg), cfg, round=1)
    state = torch.load(path, weights_only=True)
    if kind == "code on unpickling":
        torch.save({**state, "round": Payload(marker)}, path)
    elif kind == "bare pickle":  # not torch's zip format at all: the legacy loader, pickle protocol 4
        path.write_bytes(pickle.dumps({**state, "head": Payload(marker)}, protocol=4))
    else:
        torch.save({**state, "model_cfg": Settings()}, path)
    return path


def _head_store_latest(path: Path) -> None:
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from fedhubert.federation.client_app import HeadStore

    HeadStore(path.parent, SimpleNamespace(state=RecordDict()), keep=2, prefix="head").latest(up_to=9)


def _resume(path: Path) -> None:
    from fedhubert.federation.rundir import prepare_checkpoint_dir
    from fedhubert.federation.tasks import get_task

    cfg = tiny_cfg(path.parent.parent.parent)  # <tmp>/ckpt/server/round_1.pt
    prepare_checkpoint_dir(cfg, get_task("pretraining"), {}, resume=True, overwrite=False)


def _init_checkpoint(path: Path) -> None:
    from fedhubert.federation.tasks import init_from_checkpoint

    init_from_checkpoint(tiny_cfg(path.parent, f"federation.init_checkpoint={path}"))


def _kmeans_features(path: Path) -> None:
    from fedhubert.features import HubertFeatures

    HubertFeatures(tiny_cfg(path.parent, "kmeans.features=hubert", f"kmeans.checkpoint={path}", "training.device=cpu"))


def _teacher(path: Path) -> None:
    from fedhubert.federation.tasks import load_teacher

    load_teacher(tiny_cfg(path.parent, f"distillation.teacher_model_path={path}"), {})


def _s3prl_upstream(path: Path) -> None:
    from fedhubert.evaluate import s3prl_upstream

    s3prl_upstream(path)


def _s3prl_runner(path: Path) -> None:
    from fedhubert import s3prl_runner

    s3prl_runner.check_arguments(["-m", "train", "-u", "hubert_local", "-k", str(path), "-d", "speech_commands",
                                  "-c", str(REPO / "configs" / "s3prl" / "speech_commands.yaml"), "--device", "cpu"])


def _saved_head(path: Path) -> None:
    from fedhubert.federation.tasks import saved_head

    saved_head(path.parent, "head", 9)


def _read(path: Path) -> None:
    from fedhubert.checkpoint import read_checkpoint

    read_checkpoint(path)


def _load(path: Path) -> None:
    from fedhubert.checkpoint import load_checkpoint

    load_checkpoint(path)


# (loader, where it finds its file under tmp_path, how it is called)
LOADERS = [
    ("read_checkpoint", "model.pt", _read),
    ("load_checkpoint", "model.pt", _load),
    ("--resume", "ckpt/server/round_1.pt", _resume),
    ("federation.init_checkpoint", "init.pt", _init_checkpoint),
    ("kmeans.checkpoint (HubertFeatures)", "features.pt", _kmeans_features),
    ("distillation teacher", "teacher.pt", _teacher),
    ("evaluation's s3prl upstream", "best.pt", _s3prl_upstream),
    ("run_s3prl_downstream -u hubert_local -k", "best.pt", _s3prl_runner),
    ("a client's head (HeadStore)", "clients/client_0/head_round_1.pt", _head_store_latest),
    ("a teacher head (saved_head)", "heads/head_round_1.pt", _saved_head),
]
PAYLOADS = ["code on unpickling", "bare pickle", "a class instance"]


def test_the_payload_is_live(tmp_path):
    """The files below would run their code if anything unpickled them unsafely."""
    marker = tmp_path / "ran"
    path = write_payload(tmp_path / "model.pt", "code on unpickling", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("loader, where, call", LOADERS, ids=[loader[0] for loader in LOADERS])
def test_every_loader_refuses_pickled_objects_without_running_them(tmp_path, monkeypatch, loader, where, call, kind):
    from fedhubert.errors import DataError

    # torch.load's default is weights_only, unless this is set: no loader may depend on that default (s3prl's does)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    write_payload(path, kind, marker)
    with pytest.raises(DataError) as raised:
        call(path)
    message = str(raised.value)
    assert str(path) in message and "refused: it holds pickled Python objects" in message, message
    assert "\n" not in message and "weights_only=False" not in message  # one line, and no advice to load it unsafely
    assert not marker.exists()
    if kind == "a class instance":
        assert f"GLOBAL {__name__}.Settings" in message


# --- the ServerApp's round loop on a fake Grid: stragglers, late replies, interrupted checkpoint writes ------

SERVER_NODES = [21, 22, 23]


class Clients:
    """The ClientApp's replies without training, on a FakeGrid (``self.grid``): partition k (node
    SERVER_NODES[k]) moves every weight it receives by 0.001 (k + 1) and reports a validation loss that
    falls with the round. ``faults[(round, k)]`` changes k's train reply of that round: "straggle" (no
    reply in time; it turns up among the next round's replies), or a function changing its content."""

    def __init__(self, wire_dtype: str = "float32", faults: dict | None = None) -> None:
        self.grid = FakeGrid(SERVER_NODES, self)
        self.wire_dtype, self.faults = wire_dtype, faults or {}
        self.late: list[tuple[int, Message]] = []  # (the round it turns up in, the reply)

    def __call__(self, msg: Message) -> Message | None:
        pid = SERVER_NODES.index(msg.metadata.dst_node_id)
        rnd = int(msg.content["config"]["server-round"])
        metrics = {"num-examples": 10, "partition-id": pid}
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({"metrics": MetricRecord({"loss": 10.0 - rnd + 0.1 * pid, **metrics})}),
                           reply_to=msg)
        self.grid.extra += [reply for due, reply in self.late if due == rnd]  # last round's stragglers
        self.late = [(due, reply) for due, reply in self.late if due != rnd]
        trained = {k: v + 0.001 * (pid + 1) for k, v in decode_arrays(msg.content["arrays"]).items()}
        content = RecordDict({"arrays": encode_arrays(trained, self.wire_dtype),
                              "metrics": MetricRecord({"loss": 9.0 - rnd, **metrics})})
        fault = self.faults.get((rnd, pid))
        if fault == "straggle":  # its reply, +1000 on every weight, arrives a round late
            late = {k: v + 1000.0 for k, v in decode_arrays(msg.content["arrays"]).items()}
            content["arrays"] = encode_arrays(late, self.wire_dtype)
            self.late.append((rnd + 1, Message(content, reply_to=msg)))
            return None
        if fault is not None:
            fault(content)
        return Message(content, reply_to=msg)


def server_cfg(tmp_path: Path, *overrides: str):
    (tmp_path / "parts").mkdir(exist_ok=True)  # no targets.json, no codebook: the run only needs a folder
    return tiny_cfg(tmp_path, "federation.strategy=fedavg", "federation.round_timeout=7", *overrides)


def run(cfg, clients: Clients | None = None, resume: bool = False) -> dict:
    from fedhubert.federation.server_app import run_server

    return run_server((clients or Clients()).grid, cfg, resume=resume)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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


# --- checkpoint writes cut short ------------------------------------------------------------------------

def half_written(exc: BaseException):
    """A torch.save that writes half of the file, then fails with ``exc`` (the disk filled up)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise exc
    return save


def no_rename(exc: BaseException):
    """An os.replace that never happens: the process fails (or is interrupted) between write and rename."""
    def replace(src, dst):
        raise exc
    return replace


TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
WRITE_FAULTS = [
    ("disk full (OSError ENOSPC)", "torch.save", half_written(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
     "[Errno 28] No space left on device"),
    # what torch's zip writer raises on a full disk (measured: torch.save to /dev/full)
    ("disk full (torch's writer)", "torch.save", half_written(RuntimeError(TORCH_FULL_DISK)), TORCH_FULL_DISK),
    ("the rename fails", "os.replace", no_rename(OSError(errno.EIO, os.strerror(errno.EIO))),
     "[Errno 5] Input/output error"),
    ("interrupted before the rename", "os.replace", no_rename(KeyboardInterrupt()), None),
]


@pytest.mark.parametrize("case, target, fault, reason", WRITE_FAULTS, ids=[w[0] for w in WRITE_FAULTS])
def test_a_failed_checkpoint_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch, case, target,
                                                                               fault, reason):
    import fedhubert.fileio
    from fedhubert.checkpoint import load_checkpoint, save_checkpoint
    from fedhubert.errors import OutputError
    from fedhubert.federation.task import build_model

    cfg = tiny_cfg(tmp_path)
    path = tmp_path / "server" / "best_global_model.pt"  # rewritten in place whenever the model improves
    save_checkpoint(path, build_model(cfg), cfg, round=1)
    before = path.read_bytes()
    model = build_model(cfg)
    torch.nn.init.zeros_(model.final_proj.weight)
    monkeypatch.setattr(*((torch, "save") if target == "torch.save" else (fedhubert.fileio.os, "replace")), fault)
    with pytest.raises(KeyboardInterrupt if reason is None else OutputError) as raised:
        save_checkpoint(path, model, cfg, round=2)
    monkeypatch.undo()
    if reason is not None:
        message = str(raised.value)
        assert message.startswith(f"could not write {path} ({reason}; ") and " MiB free there); an earlier file of " \
            "that name is unchanged" in message, message
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert load_checkpoint(path)[2]["round"] == 1


def test_a_full_disk_stops_the_run_at_the_last_good_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    cfg = server_cfg(tmp_path, "federation.num_rounds=2")
    server = tmp_path / "ckpt" / "server"
    full_disk, before = half_written(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), {}
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".round_2.pt."):  # the disk fills up while round 2 is written
            before.update({p.name: p.read_bytes() for p in server.iterdir() if p.name != Path(f).name})
            return full_disk(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(FederationError) as raised:
        run(cfg)
    message = str(raised.value)
    assert message.startswith(f"round 2: could not write {server / 'round_2.pt'} ([Errno 28] No space left on device; ")
    assert f"Last good checkpoint: {server / 'round_1.pt'} " in message
    monkeypatch.undo()
    assert sorted(before) == ["best_global_model.pt", "round_0.pt", "round_1.pt"]
    assert {p.name: p.read_bytes() for p in server.iterdir()} == before  # byte for byte, and no temporary file

    result = run(server_cfg(tmp_path, "federation.num_rounds=2"), resume=True)
    assert [r["round"] for r in result["history"]] == [0, 1, 2]
    assert [r["round"] for r in read_jsonl(tmp_path / "ckpt" / "metrics.jsonl")] == [0, 1, 2]
    assert [rnd for rnd, _ in round_files(server)] == [0, 1, 2]
    assert not [p for p in server.iterdir() if p.name.endswith(".tmp")]


KILLED_WRITE = """
import json, os, signal, sys
import fedhubert.fileio
from fedhubert.checkpoint import save_checkpoint
from fedhubert.config import config_from_dict
from fedhubert.federation.task import build_model

cfg = config_from_dict(json.loads(sys.argv[1]))
fedhubert.fileio.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # dies before the rename
save_checkpoint(sys.argv[2], build_model(cfg), cfg, round=2)
"""


def test_a_write_killed_before_its_rename_is_never_resumed_from(tmp_path):
    from fedhubert.federation.rundir import check_resume
    from fedhubert.federation.server_app import ServerCheckpoints
    from fedhubert.federation.task import absolutize_paths
    from fedhubert.federation.tasks import get_task

    run(server_cfg(tmp_path, "federation.num_rounds=1"))
    server = tmp_path / "ckpt" / "server"
    cfg = server_cfg(tmp_path, "federation.num_rounds=2")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, json.dumps(cfg.to_dict()), str(server / "round_2.pt")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    leftover = list(server.glob(".round_2.pt.*.tmp"))  # SIGKILL cannot be caught: the temporary file stays
    assert len(leftover) == 1 and leftover[0].stat().st_size > 0, sorted(p.name for p in server.iterdir())

    task = get_task("pretraining")
    listed = [rnd for rnd, _ in ServerCheckpoints(cfg, task).rounds()]
    assert [rnd for rnd, _ in round_files(server)] == listed == [0, 1]
    assert check_resume(absolutize_paths(cfg), task, {}) == (1, server / "round_1.pt")
    result = run(cfg, resume=True)
    assert [r["round"] for r in result["history"]] == [0, 1, 2]
    assert [rnd for rnd, _ in round_files(server)] == [0, 1, 2]
    assert leftover[0].exists()  # never listed, never deleted: fileio.py says it is safe to remove
