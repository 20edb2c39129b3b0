"""Flower 1.42's server strategies (``federation.strategy``: FedAvg, FedAvgM, FedAdam, FedYogi) as
Flower gives them, with the statistic their step starts from chosen by ``federation.aggregation``
(aggregation.py), noised for client-level differential privacy with ``privacy.enabled`` (privacy.py),
made safe for this project by one mixin:

- a client whose reply is an error, or whose update holds NaN/Inf, is left out of the aggregate;
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
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fedhubert.config import Config
from fedhubert.federation.aggregation import ServerAggregation
from fedhubert.federation.privacy import KEY_CLIPPING_NORM, PrivateAggregation, sample_size
from fedhubert.federation.task import decode_array, encode_arrays, payload_bytes

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened to the messages of one train or evaluate step of a round."""
    sampled: int = 0
    succeeded: list[int] = field(default_factory=list)          # partition ids
    failed: list[tuple[str, str]] = field(default_factory=list)  # (node or partition, reason)
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)      # epsilon so far and the round's DP figures
    bytes_sent: dict[int, int] = field(default_factory=dict)      # per node id, server → client
    bytes_received: dict[int, int] = field(default_factory=dict)  # per partition id, client → server


def all_finite(values: Iterable[np.ndarray | float]) -> bool:
    return all(np.isfinite(v).all() for v in values)


STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}
STATE_NAMES = ("m_t", "v_t", "momentum_vector")  # the server optimizers' state, where a strategy has it


def make_strategy(cfg: Config) -> "RobustStrategy":
    """``federation.strategy`` with the mixin below, every knob from the config."""
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
    strategy.wire_dtype = f.wire_dtype
    strategy.aggregation, strategy.trim_fraction = f.aggregation, f.trim_fraction
    if cfg.privacy.enabled:
        strategy.privacy = PrivateAggregation(cfg.privacy, population=cfg.partition.num_clients, sampled=sample_size(cfg))
    strategy.train_report, strategy.evaluate_report = RoundReport(), RoundReport()
    return strategy


class RobustStrategy:
    """Mixed in before a Flower strategy class (see make_strategy)."""
    wire_dtype: str
    privacy: PrivateAggregation | None  # ServerAggregation's: None unless privacy.enabled
    train_report: RoundReport
    evaluate_report: RoundReport

    # --- outgoing --------------------------------------------------------------------------------
    def _encode(self, messages: Iterable[Message], arrays: ArrayRecord, report: RoundReport) -> list[Message]:
        wire = encode_arrays({k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}, self.wire_dtype)
        size = payload_bytes(wire)
        messages = list(messages)
        for message in messages:
            message.content[self.arrayrecord_key] = wire
            report.bytes_sent[message.metadata.dst_node_id] = size
        report.sampled = len(messages)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.train_report = RoundReport()
        if self.privacy is not None and self.privacy.clipping == "client":
            config[KEY_CLIPPING_NORM] = self.privacy.clipping_norm  # read by Flower's fixedclipping_mod on the client
        # super() remembers the float32 arrays as FedAdam's x_t; only the copies on the wire are cast.
        return self._encode(super().configure_train(server_round, arrays, config, grid), arrays, self.train_report)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        self.evaluate_report = RoundReport()
        return self._encode(super().configure_evaluate(server_round, arrays, config, grid), arrays,
                            self.evaluate_report)

    # --- incoming --------------------------------------------------------------------------------
    def _screen(self, replies: Iterable[Message], report: RoundReport, with_arrays: bool) -> list[Message]:
        """Keeps the replies that carry finite results, decoded to float32, in partition order."""
        good: list[tuple[int, Message]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                report.failed.append((f"node {node}", f"client raised: {msg.error.reason}"))
                continue
            metrics = dict(msg.content["metrics"])
            pid = int(metrics.pop("partition-id"))
            if with_arrays:
                record = msg.content[self.arrayrecord_key]
                report.bytes_received[pid] = payload_bytes(record)
                decoded = {k: decode_array(a) for k, a in record.items()}
                if not all_finite(decoded.values()):
                    report.failed.append((f"client {pid}", "update contains NaN/Inf"))
                    continue
                msg.content[self.arrayrecord_key] = ArrayRecord({k: Array(v) for k, v in decoded.items()})
            if not all_finite(v for v in metrics.values() if not isinstance(v, list)):
                report.failed.append((f"client {pid}", "metrics contain NaN/Inf"))
                continue
            msg.content["metrics"] = MetricRecord(metrics)  # without partition-id: not a quantity to average
            report.client_metrics[pid] = {k: float(v) for k, v in metrics.items()}
            good.append((pid, msg))
        for who, reason in report.failed:
            log.warning("left out of the aggregate: %s: %s", who, reason)
        report.succeeded = [pid for pid, _ in sorted(good, key=lambda x: x[0])]
        return [msg for _, msg in sorted(good, key=lambda x: x[0])]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._screen(replies, self.train_report, with_arrays=True)
        if len(good) < self.min_train_nodes:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is None:
            return None, None
        if self.privacy is not None:
            self.train_report.privacy = dict(self.privacy.last_round)
        return ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._screen(replies, self.evaluate_report, with_arrays=False)
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
