"""Flower 1.42's server strategies (``federation.strategy``: FedAvg, FedAvgM, FedAdam, FedYogi) as
Flower gives them, with the statistic their step starts from chosen by ``federation.aggregation``
(aggregation.py), noised for client-level differential privacy with ``privacy.enabled`` (privacy.py),
made safe for this project by one mixin:

- a client whose reply is an error, malformed (replies.py: records, metrics, array names, shapes, dtypes
  and sizes against the global arrays sent), or holds NaN/Inf, is left out of the aggregate, and so is a
  sampled client that did not reply within ``federation.round_timeout`` (reason ``timeout``), or whose
  reply Flower replaced with an error (e.g. a killed SuperNode's: ``no reply: ... Node Unavailable``); a
  late reply to an earlier round, or one from a node that was sent nothing, is ignored;
- weights travel in the configured wire dtype and are averaged in float32, in partition order;
- the server optimizer's float64 result is cast back to float32 before it goes on the wire or to disk;
- the optimizer state (FedAdam/FedYogi's m_t and v_t, FedAvgM's momentum) and the privacy ledger can be
  saved and restored, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedhubert.config import Config
from fedhubert.federation.aggregation import ServerAggregation
from fedhubert.federation.privacy import PrivateAggregation, sample_size
from fedhubert.federation.replies import PARTITION_KEY, Sent, screen, timed_out
from fedhubert.federation.task import decode_array, encode_arrays, payload_bytes

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened to the messages of one train or evaluate step of a round."""
    sampled: int = 0
    succeeded: list[int] = field(default_factory=list)          # partition ids
    nodes: dict[int, int] = field(default_factory=dict)          # partition id -> the node id it replied from
    failed: list[tuple[str, str]] = field(default_factory=list)  # (node or partition, reason): one per sampled node
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (node, reason): late or unasked-for replies
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)      # epsilon so far and the round's DP figures
    bytes_sent: dict[int, int] = field(default_factory=dict)      # per node id, server → client
    bytes_received: dict[int, int] = field(default_factory=dict)  # per partition id, client → server


def all_finite(values: Iterable[np.ndarray | float]) -> bool:
    return all(np.isfinite(v).all() for v in values)


STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}
STATE_NAMES = ("m_t", "v_t", "momentum_vector")  # the server optimizers' state, where a strategy has it


def make_strategy(cfg: Config, num_rounds: int | None = None) -> "RobustStrategy":
    """``federation.strategy`` with the mixin below, every knob from the config; ``num_rounds`` (default
    federation.num_rounds) is what ``privacy.target_epsilon`` is spread over."""
    f = cfg.federation
    base = STRATEGIES[f.strategy]
    kwargs = dict(fraction_train=f.fraction_fit, fraction_evaluate=f.fraction_evaluate,
                  min_train_nodes=f.min_fit_clients, min_evaluate_nodes=f.min_evaluate_clients,
                  min_available_nodes=f.min_available_clients)
    if f.strategy == "fedavgm":
        kwargs.update(server_learning_rate=f.eta, server_momentum=f.server_momentum)
    elif f.strategy in ("fedadam", "fedyogi"):
        kwargs.update(eta=f.eta, eta_l=cfg.training.learning_rate, beta_1=f.beta_1, beta_2=f.beta_2, tau=f.tau)
    # ServerAggregation lands between the server optimizer and FedAvg in the MRO (RobustFedAdam, RobustStrategy,
    # FedAdam, FedOpt, ServerAggregation, FedAvg): FedAdam's super().aggregate_train() reaches it, not FedAvg's mean.
    bases = (RobustStrategy, ServerAggregation) if base is FedAvg else (RobustStrategy, base, ServerAggregation)
    strategy = type(f"Robust{base.__name__}", bases, {})(**kwargs)
    strategy.wire_dtype, strategy.round_timeout = f.wire_dtype, f.round_timeout
    strategy.aggregation, strategy.trim_fraction = f.aggregation, f.trim_fraction
    if cfg.privacy.enabled:
        strategy.privacy = PrivateAggregation(cfg.privacy, population=cfg.partition.num_clients, sampled=sample_size(cfg),
                                              rounds=num_rounds or f.num_rounds)
    strategy.train_report, strategy.evaluate_report, strategy.sent = RoundReport(), RoundReport(), {}
    strategy.norm_bits = {}
    return strategy


class RobustStrategy:
    """Mixed in before a Flower strategy class (see make_strategy)."""
    wire_dtype: str
    round_timeout: float
    privacy: PrivateAggregation | None  # ServerAggregation's: None unless privacy.enabled
    train_report: RoundReport
    evaluate_report: RoundReport
    sent: dict[str, Sent]  # per message type: what the replies of the current step must match

    # --- outgoing --------------------------------------------------------------------------------
    def _encode(self, server_round: int, kind: str, messages: Iterable[Message], arrays: ArrayRecord,
                report: RoundReport) -> list[Message]:
        wire = encode_arrays({k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}, self.wire_dtype)
        size = payload_bytes(wire)
        messages = list(messages)
        for message in messages:
            message.content[self.arrayrecord_key] = wire
            message.metadata.group_id = str(server_round)  # a reply carries it back: a late one is recognised
            report.bytes_sent[message.metadata.dst_node_id] = size
        report.sampled = len(messages)
        returned = {k: (tuple(a.shape), a.dtype) for k, a in wire.items()} if kind == MessageType.TRAIN else {}
        self.sent[kind] = Sent(server_round, kind, [m.metadata.dst_node_id for m in messages], returned,
                               metadata=[m.metadata for m in messages])  # ids set by the Grid's push
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.train_report = RoundReport()
        if self.privacy is not None:  # privacy.clipping=client: C (and whether to report the norm bit) for the mod
            for key, value in self.privacy.train_config().items():
                config[key] = value
        # super() remembers the float32 arrays as FedAdam's x_t; only the copies on the wire are cast.
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._encode(server_round, MessageType.TRAIN, messages, arrays, self.train_report)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        self.evaluate_report = RoundReport()
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._encode(server_round, MessageType.EVALUATE, messages, arrays, self.evaluate_report)

    # --- incoming --------------------------------------------------------------------------------
    def _screen(self, server_round: int, message_type: str, replies: Iterable[Message], report: RoundReport
                ) -> list[Message]:
        """Keeps the replies of this step that are well-formed and finite, their arrays decoded to float32,
        in partition order; every sampled node that is not kept gets one entry in ``report.failed``."""
        sent = self.sent.get(message_type)
        if sent is None or sent.round != server_round:
            raise RuntimeError(f"aggregate of round {server_round}'s {message_type} replies without its configure step")
        with_arrays = message_type == MessageType.TRAIN
        if with_arrays:
            self.norm_bits = {}
        kept, answered = screen(replies, sent, report.failed, report.ignored, self.arrayrecord_key)
        wants_bit = with_arrays and self.privacy is not None and self.privacy.bits_from_clients
        good: dict[int, Message] = {}
        for pid, msg in kept.items():
            if wants_bit and msg.content["metrics"].get(KEY_NORM_BIT) not in (0, 1):
                report.failed.append((f"client {pid}", f"metrics carry no '{KEY_NORM_BIT}' of 0 or 1 (privacy.adaptive_"
                                      "clipping with clipping client: Flower's adaptiveclipping_mod reports it)"))
                continue
            if with_arrays:  # every array checked against the global one: decoding allocates no more than it
                record = msg.content[self.arrayrecord_key]
                report.bytes_received[pid] = payload_bytes(record)
                decoded = {k: decode_array(a) for k, a in record.items()}
                if not all_finite(decoded.values()):
                    report.failed.append((f"client {pid}", "update contains NaN/Inf"))
                    continue
                msg.content[self.arrayrecord_key] = ArrayRecord({k: Array(v) for k, v in decoded.items()})
            if wants_bit:  # for the noised count only: never averaged or logged un-noised
                self.norm_bits[msg.metadata.src_node_id] = bool(msg.content["metrics"][KEY_NORM_BIT])
            metrics = {k: v for k, v in msg.content["metrics"].items() if k not in (PARTITION_KEY, KEY_NORM_BIT)}
            msg.content["metrics"] = MetricRecord(metrics)  # without partition-id: not a quantity to average
            good[pid] = msg
        self._agree_on_metric_keys(good, report)
        report.failed += timed_out(sent, answered, self.round_timeout)
        for who, reason in report.failed:
            log.warning("left out of the aggregate: %s: %s", who, reason)
        for who, reason in report.ignored:
            log.warning("%s: %s", who, reason)
        report.succeeded = sorted(good)
        report.nodes = {pid: good[pid].metadata.src_node_id for pid in sorted(good)}
        report.client_metrics = {pid: {k: float(v) for k, v in good[pid].content["metrics"].items()}
                                 for pid in sorted(good)}
        return [good[pid] for pid in sorted(good)]

    @staticmethod
    def _agree_on_metric_keys(good: dict[int, Message], report: RoundReport) -> None:
        """Flower's aggregation raises when the replies' metric names differ: the names most replies
        carry (ties: the lowest partition's) are kept, a reply with others is left out."""
        keys = {pid: frozenset(msg.content["metrics"].keys()) for pid, msg in good.items()}
        if len(set(keys.values())) <= 1:
            return
        counts = {k: sum(v == k for v in keys.values()) for k in keys.values()}
        common = max(sorted(keys.items()), key=lambda item: counts[item[1]])[1]
        for pid, names in sorted(keys.items()):
            if names != common:
                missing, extra = sorted(common - names), sorted(names - common)
                report.failed.append((f"client {pid}", f"metric names differ from the other clients' "
                                                       f"(missing {missing}, unexpected {extra})"))
                del good[pid]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._screen(server_round, MessageType.TRAIN, replies, self.train_report)
        if len(good) < self.min_train_nodes:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is None:
            return None, None
        if self.privacy is not None:
            self.train_report.privacy = dict(self.privacy.last_round)
        return ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._screen(server_round, MessageType.EVALUATE, replies, self.evaluate_report)
        return super().aggregate_evaluate(server_round, good) if good else None

    # --- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The server optimizer's state as plain tensors (torch.load(weights_only=True)-safe); FedAvgM's
        momentum is a list, stored under its indices."""
        state = {}
        for name in STATE_NAMES:
            if hasattr(self, name):
                value = getattr(self, name) or {}
                items = value.items() if isinstance(value, dict) else enumerate(value)
                state[name] = {str(k): torch.from_numpy(np.asarray(v)) for k, v in items}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()  # plain types: Flower's ledger of the rounds composed
        return state

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, saved in state.items():
            if name == "privacy":
                if self.privacy is not None:
                    self.privacy.load_state_dict(saved)
                continue
            if name == "momentum_vector":
                value = [saved[str(i)].numpy() for i in range(len(saved))] or None
            else:
                value = {k: v.numpy() for k, v in saved.items()} or None
            setattr(self, name, value)
