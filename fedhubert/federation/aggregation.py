"""The statistic that turns the clients' models into one (``federation.aggregation``), for every server
optimizer at once.

Flower's FedAdam, FedYogi and FedAvgM all start their ``aggregate_train`` with ``super().aggregate_train``,
i.e. FedAvg's weighted mean of the client models, and then step from it (FedAdam: ``delta_t = mean -
x_t``, then ``m_t``, ``v_t``). :class:`ServerAggregation` is placed just above FedAvg in every strategy's
MRO (see ``strategy.make_strategy``) and replaces that mean, so the server optimizer's pseudo-gradient is
computed from whatever statistic is configured:

- ``mean``: Flower's own ``FedAvg.aggregate_train``, untouched (weighted by ``num-examples``);
- ``median`` / ``trimmed_mean``: Flower's ``aggregate_median`` / ``aggregate_trimmed_avg``, coordinate-wise,
  each client one vote (``num-examples`` is ignored: a weight is something an attacker could inflate);
- with ``privacy.enabled``, the noised mean of the clients' clipped updates (privacy.py).

Median and trimmed mean are translation-equivariant per coordinate, so taking them of the models is the
same as taking them of the updates (models minus the global weights) and adding the global weights back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedhubert.federation.privacy import PrivateAggregation

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "median", "trimmed_mean")


def trimmed_per_side(num_clients: int, trim_fraction: float) -> int:
    """Clients cut from each end by ``aggregate_trimmed_avg``: int(trim_fraction x n), Flower's (and
    scipy.stats.trim_mean's) rounding, so 0.2 cuts nothing below 5 clients."""
    return int(trim_fraction * num_clients)


def robust_aggregate(models: list[dict[str, np.ndarray]], method: str, trim_fraction: float = 0.0
                     ) -> dict[str, np.ndarray]:
    """The coordinate-wise median or trimmed mean of the clients' arrays (same keys in every model)."""
    keys = list(models[0])
    results = [([model[k] for k in keys], 1) for model in models]  # Flower's (arrays, num_examples) pairs
    if method == "median":
        combined = aggregate_median(results)
    elif method == "trimmed_mean":
        combined = aggregate_trimmed_avg(results, trim_fraction)
    else:
        raise ValueError(f"not a robust aggregation: {method!r}")
    return {k: np.asarray(v) for k, v in zip(keys, combined, strict=True)}


class ServerAggregation(FedAvg):
    """FedAvg's ``aggregate_train`` with its weighted mean replaced by the configured statistic; every
    strategy of make_strategy inherits it between its own step and FedAvg."""
    aggregation: str = "mean"
    trim_fraction: float = 0.0
    privacy: PrivateAggregation | None = None
    global_arrays: dict[str, np.ndarray] | None = None  # x_t: what this round's clients started from
    num_sampled: int = 0
    norm_bits: dict[int, bool]  # per node: "my update was clipped", from adaptiveclipping_mod (strategy.py's _screen)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.global_arrays = {k: a.numpy() for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_sampled = len(messages)  # the private mean divides by this, not by the replies that came back
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.aggregation == "mean" and self.privacy is None:
            return super().aggregate_train(server_round, replies)  # Flower's weighted mean, bit for bit
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        models = [{k: a.numpy() for k, a in content[self.arrayrecord_key].items()} for content in contents]
        if self.privacy is not None:
            clipped = ([self.norm_bits[msg.metadata.src_node_id] for msg in valid] if self.privacy.bits_from_clients
                       else None)
            combined = self.privacy.aggregate(models, self.global_arrays, self.num_sampled, clipped)
        else:
            if self.aggregation == "trimmed_mean" and trimmed_per_side(len(models), self.trim_fraction) == 0:
                log.warning("round %d: trimmed_mean with federation.trim_fraction %g cuts no client of %d: this "
                            "round's aggregate is the plain (unweighted) mean", server_round, self.trim_fraction,
                            len(models))
            combined = robust_aggregate(models, self.aggregation, self.trim_fraction)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # client metrics: still weighted
        return ArrayRecord({k: Array(v) for k, v in combined.items()}), metrics
