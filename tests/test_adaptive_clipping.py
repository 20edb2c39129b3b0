"""privacy.adaptive_clipping and privacy.target_epsilon, in-process: C converging to the target quantile of
synthetic update norms, the update noised with z_delta while the pair of releases costs exactly z, the
derived z the smallest that meets the target, C surviving --resume, and the client-side path through
Flower's adaptiveclipping_mod."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from conftest import fed_config
from fake_grid import FakeGrid
from fedhubert.errors import ConfigError
from fedhubert.federation.metrics import progress_line
from fedhubert.federation.privacy import KEY_ADAPTIVE_CLIPPING, client_clipping_mod
from fedhubert.federation.privacy_accounting import Z_RTOL, spent_epsilon
from fedhubert.federation.strategy import make_strategy
from test_aggregation import models, reply, start
from test_privacy import flat_norm, minus

ADAPTIVE = ["privacy.enabled=true", "privacy.adaptive_clipping=true", "privacy.noise_multiplier=1.3",
            "privacy.clipping_norm=0.5"]


def strategy(*overrides: str):
    return make_strategy(fed_config(("/x", "/y"), "/z", *ADAPTIVE, *overrides))


def z_delta(z: float, sigma_b: float) -> float:
    """Andrew et al.'s Theorem 1, written out independently of Flower's compute_adaptive_noise_params."""
    return 1 / math.sqrt(1 / z**2 - 1 / (2 * sigma_b) ** 2)


@pytest.mark.parametrize("quantile, start_norm", [(0.5, 0.1), (0.5, 30.0), (0.8, 0.1)])
def test_the_clip_norm_moves_to_the_target_quantile_of_the_update_norms(quantile, start_norm):
    """20 clients whose update norms are uniform on [1, 3] each round: the gamma-quantile is 1 + 2 gamma."""
    privacy = strategy("partition.num_clients=20", f"privacy.target_unclipped_quantile={quantile}",
                       f"privacy.clipping_norm={start_norm}").privacy
    privacy.rng = np.random.default_rng(0)
    data = np.random.default_rng(1)
    global_arrays = {"w": np.zeros(8, np.float32)}
    history = []
    for _ in range(90):
        directions = data.normal(size=(20, 8))
        norms = data.uniform(1.0, 3.0, 20)
        updates = [{"w": (d / np.linalg.norm(d) * n).astype(np.float32)} for d, n in zip(directions, norms)]
        before = privacy.clipping_norm
        privacy.aggregate(updates, global_arrays, 20)
        figures = privacy.last_round
        assert figures["clipping_norm"] == before and figures["next_clipping_norm"] == privacy.clipping_norm
        history.append(privacy.clipping_norm)
    target = 1 + 2 * quantile
    settled = float(np.exp(np.mean(np.log(history[-30:]))))
    assert settled == pytest.approx(target, rel=0.1)
    assert abs(history[0] - start_norm) < abs(history[0] - target)  # it started far away: this is movement
    assert f"C {figures['clipping_norm']:.4g}" in progress_line({"round": 90, "privacy": figures})


def test_the_update_is_noised_with_z_delta_and_the_pair_of_releases_costs_z():
    from dp_accounting import dp_event, privacy_accountant, rdp

    z, sigma_b, c, n = 1.3, 1.0, 0.5, 4
    private = strategy("partition.num_clients=4", f"privacy.clipped_count_stddev={sigma_b}")
    fixed = make_strategy(fed_config(("/x", "/y"), "/z", "privacy.enabled=true", "partition.num_clients=4",
                                     "privacy.noise_multiplier=1.3", "privacy.clipping_norm=0.5")).privacy
    privacy = private.privacy
    assert privacy.plan.update_noise_multiplier == pytest.approx(z_delta(z, sigma_b), rel=1e-12)  # 1.711
    privacy.rng = np.random.default_rng(2)
    global_arrays = {"w": np.zeros((1000, 1500), np.float32)}
    out = privacy.aggregate([global_arrays] * n, global_arrays, n)
    assert out["w"].astype(np.float64).std() == pytest.approx(z_delta(z, sigma_b) * c / n, rel=0.005)
    assert privacy.last_round["noise_std"] == pytest.approx(z_delta(z, sigma_b) * c / n)
    fixed.accountant.compose(fixed.event())
    assert privacy.epsilon == fixed.epsilon  # the ledger composes the configured z, not z_delta
    # Theorem 1 in the accountant itself: the update at z_delta and the centred count at 2 sigma_b (sensitivity
    # 1/2 under add-or-remove; z_delta/2 and sigma_b under replace-one) cost what one release at z costs
    for relation, update, count, one in ((privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          z_delta(z, sigma_b), 2 * sigma_b, z),
                                         (privacy_accountant.NeighboringRelation.REPLACE_ONE,
                                          z_delta(z, sigma_b) / 2, sigma_b, z / 2)):
        pair, single = rdp.RdpAccountant(neighboring_relation=relation), rdp.RdpAccountant(neighboring_relation=relation)
        pair.compose(dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(update), dp_event.GaussianDpEvent(count)]))
        single.compose(dp_event.GaussianDpEvent(one))
        assert pair.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    # the default sigma_b = max(n/20, z) costs the update at most 15.5% more noise
    default = strategy("partition.num_clients=4").privacy
    assert default.plan.count_stddev == z and default.plan.update_noise_multiplier == pytest.approx(z_delta(z, z))
    assert default.plan.update_noise_multiplier < 1.155 * z


def test_a_target_epsilon_gives_the_smallest_z_that_meets_it():
    cfg = fed_config(("/x", "/y"), "/z", "privacy.enabled=true", "privacy.noise_multiplier=0",
                     "privacy.target_epsilon=4", "federation.num_rounds=5")
    privacy = make_strategy(cfg).privacy
    z = privacy.noise_multiplier
    assert spent_epsilon(z, 1e-5, 3, 3, 5) <= 4 < spent_epsilon(z * (1 - 10 * Z_RTOL), 1e-5, 3, 3, 5)
    for _ in range(5):  # the run's own ledger, round by round, ends within the target
        privacy.accountant.compose(privacy.event())
    assert 4 * 0.999 < privacy.epsilon <= 4
    assert make_strategy(cfg, num_rounds=20).privacy.noise_multiplier > z  # more rounds, more noise each
    adaptive = make_strategy(fed_config(("/x", "/y"), "/z", *ADAPTIVE, "privacy.target_epsilon=4",
                                        "federation.num_rounds=5")).privacy
    assert adaptive.noise_multiplier == z and adaptive.plan.update_noise_multiplier > z
    with pytest.raises(ConfigError, match=re.escape("privacy.target_epsilon 0.001 cannot be met")):
        make_strategy(fed_config(("/x", "/y"), "/z", "privacy.enabled=true", "privacy.target_epsilon=0.001"))


def test_an_unreachable_target_stops_the_run_before_anything_is_written(federated_partitions, tmp_path):
    from fedhubert.federation.simulation import run_federated_pretraining

    cfg = fed_config(federated_partitions, tmp_path / "ckpt", "privacy.enabled=true", "privacy.target_epsilon=0.001")
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        run_federated_pretraining(cfg)
    assert not (tmp_path / "ckpt").exists()


def test_resume_goes_on_with_the_adaptive_clipping_norm(tmp_path):
    quiet = ["privacy.clipping=client", "privacy.noise_multiplier=0.01", "privacy.clipped_count_stddev=0.01"]
    first = strategy(*quiet)
    global_arrays = models(1, seed=1)[0]
    huge = [{k: v + 100.0 for k, v in global_arrays.items()} for _ in range(3)]  # all clipped: C grows
    first.privacy.aggregate(huge, global_arrays, 3)
    grown = first.privacy.clipping_norm
    assert grown == pytest.approx(0.5 * math.exp(0.2 * 0.5), rel=0.01)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = strategy(*quiet)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.privacy.clipping_norm == grown and resumed.privacy.epsilon == first.privacy.epsilon
    messages = list(resumed.configure_train(2, ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
                                            ConfigRecord(), FakeGrid([100, 101, 102])))
    assert {m.content["config"][KEY_CLIPPING_NORM] for m in messages} == {grown}  # the clients clip at it
    assert all(m.content["config"][KEY_ADAPTIVE_CLIPPING] for m in messages)
    fixed = make_strategy(fed_config(("/x", "/y"), "/z", "privacy.enabled=true", "privacy.noise_multiplier=1.3",
                                     "privacy.clipping_norm=0.5"))
    fixed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fixed.privacy.clipping_norm == 0.5  # fixed clipping keeps the configured C


def test_client_side_adaptive_clipping_reports_the_bit_through_flowers_mod():
    # z tiny (and sigma_b just above z / 2) so that the count's noise cannot hide which bits were used
    s = strategy("privacy.clipping=client", "privacy.noise_multiplier=0.01", "privacy.clipped_count_stddev=0.01")
    global_arrays = models(1, seed=8)[0]
    start(s, global_arrays)
    c = s.privacy.clipping_norm

    def through_mod(pid: int, scale: float, rnd: int = 1) -> Message:
        trained = {k: global_arrays[k] + scale * d for k, d in models(1, seed=10 + pid)[0].items()}
        config = ConfigRecord({"server-round": rnd, KEY_CLIPPING_NORM: c, KEY_ADAPTIVE_CLIPPING: True})
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in global_arrays.items()}),
                              "config": config})
        sent = Message(content=content, metadata=Metadata(run_id=0, message_id="m", src_node_id=0,
                                                          dst_node_id=100 + pid, reply_to_message_id="",
                                                          group_id=str(rnd), created_at=0.0, ttl=60.0,
                                                          message_type="train"))
        return client_clipping_mod(sent, None, lambda msg, ctx: reply(pid, trained, 4, rnd=rnd))

    small, big = through_mod(0, 1e-3), through_mod(1, 100.0)
    assert small.content["metrics"][KEY_NORM_BIT] == 0 and big.content["metrics"][KEY_NORM_BIT] == 1
    clipped_update = minus({k: a.numpy() for k, a in big.content["arrays"].items()}, global_arrays)
    assert flat_norm(clipped_update) == pytest.approx(c, rel=1e-5)
    _, metrics = s.aggregate_train(1, [small, big, through_mod(2, 100.0)])
    # the clients' bits (two of three clipped; the server sees every update at norm <= C) move C up:
    # share 1/3 < gamma 0.5
    assert s.privacy.last_round["unclipped_share"] == pytest.approx(1 / 3, abs=0.02)
    assert s.privacy.clipping_norm == pytest.approx(c * math.exp(-0.2 * (1 / 3 - 0.5)), rel=0.01)
    assert KEY_NORM_BIT not in metrics and all(KEY_NORM_BIT not in m for m in s.train_report.client_metrics.values())
    start(s, global_arrays, rnd=2)  # a reply without the bit is left out, named
    c = s.privacy.clipping_norm
    lying = through_mod(2, 100.0, rnd=2)
    del lying.content["metrics"][KEY_NORM_BIT]
    s.aggregate_train(2, [through_mod(0, 1e-3, rnd=2), through_mod(1, 100.0, rnd=2), lying])
    assert s.train_report.failed == [("client 2", f"metrics carry no '{KEY_NORM_BIT}' of 0 or 1 (privacy.adaptive_"
                                                  "clipping with clipping client: Flower's adaptiveclipping_mod reports it)")]


@pytest.mark.parametrize("overrides, message", [
    (["privacy.target_unclipped_quantile=1"], "'privacy.target_unclipped_quantile' must be in (0, 1)"),
    (["privacy.clip_norm_lr=0"], "'privacy.clip_norm_lr' must be above 0 with privacy.adaptive_clipping"),
    (["privacy.clipped_count_stddev=0.6"], "'privacy.clipped_count_stddev' (0.6) must exceed privacy.noise_multiplier / 2"),
    (["privacy.target_epsilon=-1"], "privacy.target_epsilon"),
])
def test_bad_adaptive_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        fed_config(("/x", "/y"), "/z", *ADAPTIVE, *overrides)
