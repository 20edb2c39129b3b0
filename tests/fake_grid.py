"""A Flower Grid without a SuperLink, for the strategy and ServerApp tests: every node is a Python function.

``answer(message)`` plays the node the message is for and returns its reply, or None for a node that does
not answer within the timeout: like Flower's own Grid after a timeout, ``send_and_receive`` then returns
the replies it has. Replies queued in ``extra`` (e.g. a straggler's late reply to an earlier round) are
returned alongside the next call's, which Flower's Grid never does: the server must ignore them itself.

Below it, what the fault tests share: changes to a reply (a renamed array, a huge header, a metric
removed, ...), and fake clients answering the pretraining ServerApp (:class:`Clients`) and the
federated k-means ServerApp (:class:`KmeansClients`) in-process, without training or audio.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from conftest import fed_config
from fedhubert.federation.task import decode_arrays, encode_arrays


class FakeGrid(Grid):
    def __init__(self, nodes: Iterable[int], answer: Callable[[Message], Message | None] | None = None) -> None:
        self.nodes = list(nodes)
        self.answer = answer
        self.extra: list[Message] = []
        self.timeouts: list[float | None] = []  # the timeout of every send_and_receive call
        if TaskIdentity._run_id is None:  # what Flower's runtime sets before a ServerApp builds messages
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:  # what Flower's InMemoryGrid does: the id a reply refers to
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.push_messages(messages)
        self.timeouts.append(timeout)
        replies = [reply for reply in map(self.answer, messages) if reply is not None]
        replies, self.extra = replies + self.extra, []
        return replies


# --- a reply changed on its way: each returns a function that changes a reply's RecordDict in place ----------

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
    """Metrics set to ``values``; a None value removes that metric."""
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the pretraining ServerApp's clients ----------------------------------------------------------------

SERVER_NODES = [21, 22, 23]


def tiny_cfg(tmp_path: Path, *overrides: str):
    """The tiny federation's config with every folder under ``tmp_path`` (nothing need exist)."""
    return fed_config((tmp_path / "corpus", tmp_path / "parts"), tmp_path / "ckpt", *overrides)


def server_cfg(tmp_path: Path, *overrides: str):
    (tmp_path / "parts").mkdir(exist_ok=True)  # no targets.json, no codebook: the run only needs a folder
    return tiny_cfg(tmp_path, "federation.strategy=fedavg", "federation.round_timeout=7", *overrides)


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


def run(cfg, clients: Clients | None = None, resume: bool = False) -> dict:
    """The pretraining ServerApp's run on ``clients`` (default: three honest ones)."""
    from fedhubert.federation.server_app import run_server

    return run_server((clients or Clients()).grid, cfg, resume=resume)


# --- the federated k-means ServerApp's clients -------------------------------------------------------------

KMEANS_NODES = [31, 32, 33]
KMEANS_FRAMES = 200  # frames per client: 600 in all, 30 clusters' worth at min_frames_per_cluster 20
KMEANS_DIM = 39      # MFCC's: what the server's make_features says the frames are


def kmeans_cfg(out: Path, *overrides: str):
    """The tiny federation's federated k-means (2 rounds, no early stop) writing into ``out``."""
    from conftest import TINY, make_config

    out.mkdir(exist_ok=True)
    return make_config(out / "corpus", out, *TINY, "kmeans.codebook=federated", "kmeans.max_rounds=2",
                       "kmeans.tol=0", "federation.round_timeout=9", *overrides)


class KmeansClients:
    """The k-means ClientApp's replies without audio, on a FakeGrid (``self.grid``): partition k (node
    KMEANS_NODES[k]) holds KMEANS_FRAMES random ``dim``-frames around a centre of its own and answers each
    message as kmeans_app's handlers do, with their record builders. ``faults[(message type, round, k)]``:
    "straggle" (no reply), "late" (its reply turns up among the next step's), "raise" (an error reply
    with a traceback), or a function changing its reply's content."""

    def __init__(self, dim: int, k_local: int, faults: dict | None = None, nodes: list[int] = KMEANS_NODES) -> None:
        rng = np.random.default_rng(0)
        self.frames = [rng.normal(3.0 * k, 1.0, (KMEANS_FRAMES, dim)).astype(np.float32) for k in range(3)]
        self.nodes = list(nodes)  # nodes[k] holds partition k; the grid lists them by id, as Flower does
        self.grid = FakeGrid(sorted(self.nodes), self)
        self.k_local, self.faults = k_local, faults or {}
        self.late: list[Message] = []

    def __call__(self, msg: Message) -> Message | None:
        from fedhubert import fedkmeans
        from fedhubert.federation import kmeans_app as real

        from fedhubert.federation.sampling import PARTITION_QUERY

        pid, kind = self.nodes.index(msg.metadata.dst_node_id), msg.metadata.message_type
        if kind == PARTITION_QUERY:  # client_app.partition's answer
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
        self.grid.extra, self.late = self.grid.extra + self.late, []  # the last step's late replies turn up now
        if kind == real.INIT:
            centres, counts = fedkmeans.local_centres(self.frames[pid], self.k_local, seed=pid)
            reply = real._reply(msg, {"partition-id": pid, "num-frames": KMEANS_FRAMES, "train-frames": KMEANS_FRAMES},
                                real.init_record(centres, counts))
        elif kind == real.STATS:
            stats = fedkmeans.client_stats(msg.content["arrays"]["codebook"].numpy(), [self.frames[pid]])
            reply = real._reply(msg, {"partition-id": pid}, real.stats_record(stats))
        else:
            reply = real._reply(msg, {"partition-id": pid, "train-frames": KMEANS_FRAMES, "train-utterances": 4,
                                      "valid-utterances": 2})
        fault = self.faults.get((kind, int(msg.content["config"]["server-round"]), pid))
        if fault == "raise":
            return Message(Error(code=0, reason="Traceback (most recent call last):\n  ...\n"
                                                "RuntimeError: planted failure\n"), reply_to=msg)
        if fault in ("straggle", "late"):
            self.late += [reply] if fault == "late" else []
            return None
        if fault is not None:
            fault(reply.content)
        return reply


def run_kmeans(out: Path, faults: dict | None = None, *overrides: str,
               nodes: list[int] = KMEANS_NODES) -> tuple[dict, KmeansClients]:
    """The k-means ServerApp's run into ``out`` on three KmeansClients (partition k on ``nodes[k]``) with ``faults``."""
    from fedhubert.federation.kmeans_app import run_kmeans_server

    cfg = kmeans_cfg(out, *overrides)
    clients = KmeansClients(KMEANS_DIM, cfg.kmeans.k_local or cfg.kmeans.n_clusters, faults, nodes)
    return run_kmeans_server(clients.grid, cfg), clients
