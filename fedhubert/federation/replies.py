"""What a client's reply must be before anything of it is used: by the pretraining strategy
(strategy.RobustStrategy._screen) and by federated k-means (kmeans_app._exchange), both through :func:`screen`.

A reply is matched against the messages the server sent in this step (:class:`Sent`): the same round
and message type, from a node that was sent one, and one reply per node and per partition. Its content
must be what our ClientApp sends: a MetricRecord ``metrics`` holding ``partition-id`` and the step's
weight (``num-examples``: positive) and counts (non-negative integers), every value a finite number, and
where the step returns arrays an ArrayRecord ``arrays`` with exactly the expected names, shapes and
dtypes (pretraining: the global arrays', in the wire dtype). An array's header (Flower's metadata and the
``.npy`` header inside its bytes) is read before the array is: a reply that declares a huge or
misshapen array is refused without allocating it.

Each check returns the reason a reply is refused, in one line, or None.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.lib.format as npy
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

PARTITION_KEY = "partition-id"  # who the reply is from (the client app adds it; never averaged)
WEIGHT_KEY = "num-examples"     # Flower's weighting key
NPY_HEADER_LIMIT = 10_000       # numpy's own limit on a .npy header (np.load's max_header_size)


# One dimension of an expected array: exactly this size, or any size in the range (a bounded range:
# what a reply may make the server allocate stays bounded)
Dim = int | range


@dataclass
class Sent:
    """The messages of one step (configure_train / configure_evaluate, a k-means exchange), as the
    replies must match them."""
    round: int
    message_type: str
    nodes: list[int] = field(default_factory=list)
    # name -> (shape, numpy dtype name) of the arrays a reply must hold (none: a reply holds no
    # ArrayRecord); for pretraining the global arrays sent, in the wire dtype ("uint16" for bfloat16's
    # bit pattern)
    arrays: dict[str, tuple[tuple[Dim, ...], str]] = field(default_factory=dict)
    weight: str | None = WEIGHT_KEY     # a metric every reply carries, positive (None: no such metric)
    counts: tuple[str, ...] = ()         # metrics every reply carries, each a non-negative integer
    dtype_source: str = "federation.wire_dtype"  # what sets the arrays' dtype, for the refusal's line
    # the messages' metadata: the Grid fills in each message_id when it pushes them (see stand_in_error)
    metadata: list[Metadata] = field(default_factory=list)

    def destination(self, message_id: str) -> int | None:
        """The node that this step's message ``message_id`` went to; None for another step's message."""
        return next((m.dst_node_id for m in self.metadata if message_id and m.message_id == message_id), None)


def stand_in_error(msg: Message, sent: Sent) -> tuple[int, str] | None:
    """(node, reason) when ``msg`` is an error that Flower made in place of a sampled node's reply:
    the SuperLink's NODE_UNAVAILABLE (the node stopped sending heartbeats, e.g. it was killed: about a
    minute after its last one) or REPLY_MESSAGE_UNAVAILABLE (its reply expired), or the Grid's
    MESSAGE_UNAVAILABLE (the reply's objects could not be pulled). Such an error is sent by the SuperLink
    or the ServerApp itself, not by the node, so only its ``reply_to_message_id`` names the node."""
    if not msg.has_error() or msg.metadata.src_node_id in sent.nodes:
        return None
    node = sent.destination(msg.metadata.reply_to_message_id)
    if node is None:
        return None
    return node, f"no reply: {msg.error.reason} (Flower error code {msg.error.code})"


def stale_reason(msg: Message, sent: Sent) -> str | None:
    """Why a reply does not answer this step's messages: a late reply to an earlier round (or to the
    other step), or a reply from a node that was sent nothing. Flower's Grid only returns replies to
    the messages it just sent, so this is the second line of defence."""
    meta = msg.metadata
    if meta.message_type != sent.message_type or meta.group_id != str(sent.round):
        return (f"late reply to the {meta.message_type} message of round {meta.group_id or '?'} "
                f"(this is round {sent.round}'s {sent.message_type}): ignored")
    if meta.src_node_id not in sent.nodes:
        return f"reply from node {meta.src_node_id}, which was sent no message this round: ignored"
    return None


def content_problem(content: RecordDict, with_arrays: bool, array_key: str) -> str | None:
    """The reply holds exactly a MetricRecord ``metrics`` (and for training an ArrayRecord ``array_key``)."""
    wanted: dict[str, type] = {"metrics": MetricRecord, **({array_key: ArrayRecord} if with_arrays else {})}
    names = sorted(content.keys())
    if set(names) != set(wanted):
        return f"reply holds the records {names}, expected {sorted(wanted)}"
    wrong = [f"'{name}' is a {type(content[name]).__name__}" for name, kind in wanted.items()
             if not isinstance(content[name], kind)]
    return f"reply record {', '.join(wrong)}" if wrong else None


def partition_id(metrics: MetricRecord) -> int | None:
    """The reply's ``partition-id`` when it is a non-negative integer, else None."""
    value = metrics.get(PARTITION_KEY)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value >= 0 and float(value).is_integer() else None


def metrics_problem(metrics: MetricRecord, weight: str | None = WEIGHT_KEY,
                    counts: Iterable[str] = ()) -> str | None:
    """Every metric a finite number (a list cannot be averaged or logged), ``weight`` positive (a zero
    total weight would divide by zero, a negative one flip the mean), each of ``counts`` a non-negative
    integer."""
    for key in ([weight] if weight else []) + list(counts):
        if key not in metrics:
            return f"metrics lack '{key}'"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' is a {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return f"metrics contain NaN/Inf ('{key}' is {value})"
    if weight and metrics[weight] <= 0:
        return f"'{weight}' is {metrics[weight]}: it must be positive"
    for key in counts:
        if metrics[key] < 0 or not float(metrics[key]).is_integer():
            return f"'{key}' is {metrics[key]}: it must be a non-negative integer"
    return None


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from the ``.npy`` header at the start of ``data``, reading
    nothing else; ValueError when there is no valid header."""
    handle = io.BytesIO(data)
    version = npy.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(handle, max_header_size=NPY_HEADER_LIMIT)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = npy.read_array_header_2_0(handle, max_header_size=NPY_HEADER_LIMIT)
    else:
        raise ValueError(f"unknown .npy version {version}")
    return tuple(shape), dtype, handle.tell()


def shape_text(shape: tuple[Dim, ...]) -> str:
    """``(4, 3)``; a range dimension as ``1..20``."""
    dims = [f"{d.start}..{d.stop - 1}" if isinstance(d, range) else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def fits(shape: tuple[int, ...], expected: tuple[Dim, ...]) -> bool:
    return len(shape) == len(expected) and all(
        (n in d) if isinstance(d, range) else n == d for n, d in zip(shape, expected))


def array_problem(name: str, array: Array, shape: tuple[Dim, ...], dtype: str,
                  dtype_source: str = "federation.wire_dtype") -> str | None:
    """One array against what was expected (pretraining: the global array it replaces): numpy-serialised,
    its declared and real shape ``shape``, its dtype ``dtype``, and exactly the bytes its shape needs."""
    if array.stype != "numpy.ndarray":
        return f"array '{name}' is serialised as {array.stype!r}, not as a numpy array"
    try:
        real_shape, real_dtype, offset = npy_header(array.data)
    except (ValueError, SyntaxError, TypeError) as exc:
        return f"array '{name}' has no readable .npy header ({exc})"
    declared = tuple(array.shape)
    for found in (declared, real_shape):  # Flower's metadata, then the header inside the bytes
        if not fits(found, shape):
            return f"array '{name}' has shape {found}, expected {shape_text(shape)}"
    if declared != real_shape:
        return f"array '{name}' is labelled {declared} but its .npy header says {real_shape}"
    if array.dtype != dtype:
        return f"array '{name}' is {array.dtype}, expected {dtype} ({dtype_source})"
    if real_dtype != np.dtype(dtype):  # e.g. a byte-swapped '>f4' under a 'float32' label
        return f"array '{name}' holds {real_dtype.str} data, expected {dtype} ({dtype_source})"
    needed = int(np.prod(real_shape, dtype=np.int64)) * real_dtype.itemsize
    if len(array.data) - offset != needed:
        return f"array '{name}' holds {len(array.data) - offset} bytes of data, its shape needs {needed}"
    return None


def arrays_problem(record: ArrayRecord, sent: Sent) -> str | None:
    """Exactly the expected arrays' names, each passing :func:`array_problem`."""
    names, expected = set(record.keys()), set(sent.arrays)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        parts = [f"{label} {', '.join(map(repr, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
        return f"arrays do not match the {len(expected)} expected arrays ({'; '.join(parts)})"
    for name, (shape, dtype) in sent.arrays.items():
        problem = array_problem(name, record[name], shape, dtype, sent.dtype_source)
        if problem:
            return problem
    return None


def error_reason(msg: Message) -> str:
    """A failed client's error, its last line only (a simulation's error carries Ray's traceback)."""
    lines = [line.strip() for line in str(msg.error.reason).splitlines() if line.strip()]
    return f"client raised: {lines[-1] if lines else msg.error.code}"


def screen(replies: Iterable[Message], sent: Sent, failed: list[tuple[str, str]], ignored: list[tuple[str, str]],
           array_key: str = "arrays") -> tuple[dict[int, Message], set[int]]:
    """The replies of one step that pass every check above, by partition id, and the nodes that
    answered (the others timed out). A late or unasked-for reply is added to ``ignored``; a reply that
    is an error or fails a check to ``failed``, as (who, reason): the node until its partition id is
    known, then the client. Arrays are checked by their headers only: nothing is decoded here."""
    kept: dict[int, Message] = {}
    answered: set[int] = set()  # nodes
    claimed: set[int] = set()   # partition ids
    for msg in replies:
        stand_in = stand_in_error(msg, sent)  # before the checks below: its sender is not the node
        if stand_in is not None and stand_in[0] not in answered:
            answered.add(stand_in[0])
            failed.append((f"node {stand_in[0]}", stand_in[1]))
            continue
        node = msg.metadata.src_node_id
        stale = stale_reason(msg, sent) or (f"second reply from node {node}: ignored" if node in answered else None)
        if stale:
            ignored.append((f"node {node}", stale))
            continue
        answered.add(node)
        if msg.has_error():
            failed.append((f"node {node}", error_reason(msg)))
            continue
        problem = content_problem(msg.content, bool(sent.arrays), array_key)
        pid = None if problem else partition_id(msg.content["metrics"])
        if pid is None:
            failed.append((f"node {node}", problem or f"metrics carry no valid '{PARTITION_KEY}'"))
            continue
        if pid in claimed:
            failed.append((f"node {node}", f"{PARTITION_KEY} {pid} already replied this round"))
            continue
        claimed.add(pid)
        problem = metrics_problem(msg.content["metrics"], sent.weight, sent.counts)
        if not problem and sent.arrays:
            problem = arrays_problem(msg.content[array_key], sent)
        if problem:
            failed.append((f"client {pid}", problem))
            continue
        kept[pid] = msg
    return kept, answered


def timed_out(sent: Sent, answered: set[int], timeout: float) -> list[tuple[str, str]]:
    """(node, reason) of every node sent a message that did not answer."""
    reason = f"timeout: no reply within federation.round_timeout ({timeout:g} s)"
    return [(f"node {n}", reason) for n in sent.nodes if n not in answered]
