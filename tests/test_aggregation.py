"""federation.aggregation on constructed arrays: Flower's median and trimmed mean against numpy and scipy,
the mean path bit for bit Flower's, and the robust statistic inside every server optimizer's step."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from conftest import fed_config
from fake_grid import FakeGrid
from fedhubert.errors import ConfigError
from fedhubert.federation.aggregation import robust_aggregate, trimmed_per_side
from fedhubert.federation.strategy import make_strategy

SHAPES = {"a": (4, 3), "b": (7,), "c": (2, 2, 2)}
FLOWER = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}


def models(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def reply(pid: int, arrays: dict[str, np.ndarray], num_examples: int, rnd: int = 1) -> Message:
    """A train reply of round ``rnd`` as the ServerApp receives it from partition ``pid`` (node 100 + pid)."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples, "partition-id": pid, "loss": 1.0})})
    meta = Metadata(run_id=0, message_id=f"m{pid}", src_node_id=100 + pid, dst_node_id=0, reply_to_message_id="r",
                    group_id=str(rnd), created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta)


def cfg(*overrides: str):
    return fed_config(("/x", "/y"), "/z", *overrides)


def start(strategy, arrays: dict[str, np.ndarray], rnd: int = 1) -> None:
    """configure_train of round ``rnd`` from the global ``arrays``, sent to the three nodes reply() answers from."""
    record = ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()})
    strategy.configure_train(rnd, record, ConfigRecord(), FakeGrid([100, 101, 102]))


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_median_and_trimmed_mean_match_numpy_and_scipy(n):
    clients = models(n, seed=n)
    median = robust_aggregate(clients, "median")
    for key in SHAPES:
        np.testing.assert_array_equal(median[key], np.median(np.stack([c[key] for c in clients]), axis=0))
    for fraction in (0.0, 0.2, 0.34, 0.49):
        trimmed = robust_aggregate(clients, "trimmed_mean", fraction)
        for key in SHAPES:
            expected = scipy.stats.trim_mean(np.stack([c[key] for c in clients]), fraction, axis=0)
            np.testing.assert_allclose(trimmed[key], expected, rtol=1e-6, atol=1e-7)


def test_trimming_rounds_down_as_flower_does():
    assert [trimmed_per_side(n, 0.2) for n in (3, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert trimmed_per_side(3, 0.34) == 1 and trimmed_per_side(3, 1 / 3) == 1
    clients = models(3)  # 3 clients, one cut from each end: the middle value, i.e. the median
    trimmed, median = robust_aggregate(clients, "trimmed_mean", 0.34), robust_aggregate(clients, "median")
    assert all(np.array_equal(trimmed[k], median[k]) for k in SHAPES)


@pytest.mark.parametrize("name", list(FLOWER))
def test_mean_is_flowers_own_step_bit_for_bit(name):
    clients, sizes = models(3), [5, 17, 9]
    ours = make_strategy(cfg(f"federation.strategy={name}"))
    theirs = FLOWER[name](**{k: getattr(ours, k) for k in ("eta", "eta_l", "beta_1", "beta_2", "tau")
                             if hasattr(ours, k)},
                          **({"server_learning_rate": ours.server_learning_rate, "server_momentum": ours.server_momentum}
                             if name == "fedavgm" else {}))
    global_arrays = models(1, seed=99)[0]
    for strategy in (ours, theirs):
        start(strategy, global_arrays)
    a, _ = ours.aggregate_train(1, [reply(k, c, s) for k, (c, s) in enumerate(zip(clients, sizes))])
    b, _ = theirs.aggregate_train(1, [reply(k, c, s) for k, (c, s) in enumerate(zip(clients, sizes))])
    for key in SHAPES:  # ours is cast to float32 for the wire; Flower's FedAdam/FedYogi compute in float64
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy().astype(np.float32))


@pytest.mark.parametrize("name", list(FLOWER))
@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_the_server_optimizer_steps_from_the_robust_statistic(name, method):
    """The robust aggregate replaces the mean *inside* the step: our strategy with three clients (one of them
    wild) moves exactly as Flower's own strategy does when the robust aggregate is its only client."""
    clients = models(3)
    clients[1] = {k: v * 1000 for k, v in clients[1].items()}  # an attacker
    ours = make_strategy(cfg(f"federation.strategy={name}", f"federation.aggregation={method}",
                             "federation.trim_fraction=0.34"))
    theirs = make_strategy(cfg(f"federation.strategy={name}", "federation.min_fit_clients=1"))  # one reply
    global_arrays = models(1, seed=99)[0]
    for strategy in (ours, theirs):
        start(strategy, global_arrays)
    robust = robust_aggregate(clients, method, 0.34)
    for rnd in (1, 2):  # two rounds: FedAdam's m_t, v_t and FedAvgM's momentum carry the robust aggregate on
        if rnd > 1:  # the next round starts from the new global arrays (the same for both)
            for strategy in (ours, theirs):
                start(strategy, {k: v.numpy() for k, v in a.items()}, rnd)
        a, _ = ours.aggregate_train(rnd, [reply(k, c, 10 * (k + 1), rnd) for k, c in enumerate(clients)])
        b, _ = theirs.aggregate_train(rnd, [reply(0, robust, 1, rnd)])
        for key in SHAPES:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        assert np.abs(a["a"].numpy()).max() < 10  # the attacker's 1000x weights never reach the global model


@pytest.mark.parametrize("overrides, message", [
    (["federation.aggregation=trimmed_mean"], "federation.trim_fraction (0.2) cuts no client of the 3 sampled "
                                              "per round (int(trim_fraction x 3) = 0): raise it to at least 0.334"),
    (["federation.aggregation=trimmed_mean", "federation.trim_fraction=0.5"], "'federation.trim_fraction' must be in"),
    (["federation.aggregation=mode"], "'federation.aggregation' must be one of mean, median, trimmed_mean"),
])
def test_bad_aggregation_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg(*overrides)
    cfg("federation.aggregation=trimmed_mean", "federation.trim_fraction=0.34")  # cuts one of three: fine
