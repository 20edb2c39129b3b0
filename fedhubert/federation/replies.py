"""What a client's reply must be before anything of it is aggregated (strategy.RobustStrategy._screen).

A reply is matched against the messages the server sent in this step (:class:`Sent`): the same round
and message type, from a node that was sent one. Its content must be what our ClientApp sends: a
MetricRecord ``metrics`` holding ``partition-id`` and a positive ``num-examples``, every value a finite
number, and for training an ArrayRecord ``arrays`` with exactly the global arrays' names and shapes, in
the wire dtype. An array's header (Flower's metadata and the ``.npy`` header inside its bytes) is read
before the array is: a reply that declares a huge or misshapen array is refused without allocating it.

Each check returns the reason a reply is refused, in one line, or None.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.lib.format as npy
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

PARTITION_KEY = "partition-id"  # who the reply is from (the client app adds it; never averaged)
WEIGHT_KEY = "num-examples"     # Flower's weighting key
NPY_HEADER_LIMIT = 10_000       # numpy's own limit on a .npy header (np.load's max_header_size)


@dataclass
class Sent:
    """The messages of one configure_train / configure_evaluate step, as the replies must match them."""
    round: int
    message_type: str
    nodes: list[int] = field(default_factory=list)
    # name -> (shape, numpy dtype name) of the global arrays sent (train only), in the wire dtype
    # ("uint16" for bfloat16's bit pattern): a reply's arrays must be the same
    arrays: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
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


def metrics_problem(metrics: MetricRecord) -> str | None:
    """Every metric a finite number (a list cannot be averaged or logged), ``num-examples`` positive:
    a zero total weight would divide by zero, a negative one flip the mean."""
    if WEIGHT_KEY not in metrics:
        return f"metrics lack '{WEIGHT_KEY}'"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' is a {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return f"metrics contain NaN/Inf ('{key}' is {value})"
    if metrics[WEIGHT_KEY] <= 0:
        return f"'{WEIGHT_KEY}' is {metrics[WEIGHT_KEY]}: it must be positive"
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


def array_problem(name: str, array: Array, shape: tuple[int, ...], dtype: str) -> str | None:
    """One array against the global array it replaces: numpy-serialised, its declared and real shape
    ``shape``, its dtype ``dtype``, and exactly the bytes that shape needs."""
    if array.stype != "numpy.ndarray":
        return f"array '{name}' is serialised as {array.stype!r}, not as a numpy array"
    try:
        real_shape, real_dtype, offset = npy_header(array.data)
    except (ValueError, SyntaxError, TypeError) as exc:
        return f"array '{name}' has no readable .npy header ({exc})"
    declared = tuple(array.shape)
    if declared != shape or real_shape != shape:  # Flower's metadata, then the header inside the bytes
        return f"array '{name}' has shape {declared if declared != shape else real_shape}, the global array {shape}"
    if array.dtype != dtype:
        return f"array '{name}' is {array.dtype}, expected {dtype} (federation.wire_dtype)"
    if real_dtype != np.dtype(dtype):  # e.g. a byte-swapped '>f4' under a 'float32' label
        return f"array '{name}' holds {real_dtype.str} data, expected {dtype} (federation.wire_dtype)"
    needed = int(np.prod(shape, dtype=np.int64)) * real_dtype.itemsize
    if len(array.data) - offset != needed:
        return f"array '{name}' holds {len(array.data) - offset} bytes of data, its shape needs {needed}"
    return None


def arrays_problem(record: ArrayRecord, sent: Sent) -> str | None:
    """Exactly the global arrays' names, each passing :func:`array_problem`."""
    names, expected = set(record.keys()), set(sent.arrays)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        parts = [f"{label} {', '.join(map(repr, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
        return f"arrays do not match the {len(expected)} global arrays ({'; '.join(parts)})"
    for name, (shape, dtype) in sent.arrays.items():
        problem = array_problem(name, record[name], shape, dtype)
        if problem:
            return problem
    return None
