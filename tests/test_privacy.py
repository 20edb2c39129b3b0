"""privacy.*: the private mean on constructed arrays (noise std, clipping bound, the z = 0 limit), the noise
entering before FedAdam's step, Flower's fixedclipping_mod on the client, the ledger, and one tiny run (adaptive
clipping on the clients) that stops at its privacy budget. Adaptive clipping and target_epsilon in-process:
test_adaptive_clipping.py."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from conftest import fed_config
from fedhubert.errors import ConfigError, FederationError
from fedhubert.federation.privacy import PrivateAggregation, client_clipping_mod, private_mean
from fedhubert.federation.strategy import make_strategy
from test_aggregation import SHAPES, models, reply, start

PRIVATE = ["privacy.enabled=true", "privacy.clipping_norm=0.5", "privacy.noise_multiplier=1.3"]


def flat_norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values())))


def minus(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: a[k] - b[k] for k in a}


def test_the_noise_on_the_average_has_std_z_c_over_the_sampled_count():
    z, c, sampled = 1.3, 0.5, 4
    global_arrays = {"w": np.full((1000, 1000), 0.25, np.float32), "b": np.zeros(500_000, np.float32)}
    for arrived in (4, 3):  # a dropped client changes nothing: the noise is calibrated to the sampled count
        out, _ = private_mean([dict(global_arrays)] * arrived, global_arrays, c, z, sampled, np.random.default_rng(7))
        noise = np.concatenate([minus(out, global_arrays)[k].ravel() for k in global_arrays]).astype(np.float64)
        assert noise.size == 1_500_000
        assert noise.std() == pytest.approx(z * c / sampled, rel=0.005)  # standard error of the std: 0.06%
        assert abs(noise.mean()) < 5 * z * c / sampled / np.sqrt(noise.size)
    again, _ = private_mean([global_arrays] * 4, global_arrays, c, z, sampled, np.random.default_rng(7))
    assert np.array_equal(again["w"], private_mean([global_arrays] * 4, global_arrays, c, z, sampled,
                                                   np.random.default_rng(7))[0]["w"])


def test_clipping_bounds_every_clients_contribution():
    c, sampled = 0.5, 4
    global_arrays = models(1, seed=1)[0]
    honest = [{k: v + 0.01 * d[k] for k, v in global_arrays.items()} for d in models(3, seed=2)]
    huge = {k: v + 1e4 * np.sign(v) for k, v in global_arrays.items()}
    without, norms = private_mean(honest, global_arrays, c, 0.0, sampled, np.random.default_rng(0))
    assert max(norms) < c  # the honest updates pass unclipped
    with_huge, norms = private_mean(honest + [huge], global_arrays, c, 0.0, sampled, np.random.default_rng(0))
    assert norms[-1] > 1e4
    moved = flat_norm(minus(with_huge, without))
    assert moved == pytest.approx(c / sampled, rel=1e-4) and moved <= c / sampled * (1 + 1e-5)
    # num-examples plays no part: any one client moves the average by at most C/n, whatever its data size
    alone, _ = private_mean([huge], global_arrays, c, 0.0, sampled, np.random.default_rng(0))
    assert flat_norm(minus(alone, global_arrays)) <= c / sampled * (1 + 1e-5)


def test_without_noise_and_clipping_the_private_mean_is_the_uniform_mean():
    clients, global_arrays = models(5, seed=3), models(1, seed=4)[0]
    out, _ = private_mean(clients, global_arrays, 1e9, 0.0, len(clients), np.random.default_rng(0))
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in c.items()}),
                            "metrics": MetricRecord({"num-examples": 1})}) for c in clients]
    uniform = aggregate_arrayrecords(contents, "num-examples")  # Flower's FedAvg mean with equal weights
    for key in SHAPES:
        np.testing.assert_allclose(out[key], uniform[key].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm", "fedavg"])
def test_the_server_optimizer_steps_from_the_noised_mean(name):
    """FedAdam's pseudo-gradient is the noised average update: our private strategy moves exactly as the plain
    one does when that noised average is its only client (noise first, m_t / v_t / the step after it)."""
    clients, sizes = models(3, seed=5), [3, 300, 30]  # data sizes differ: DP averaging ignores them
    ours = make_strategy(fed_config(("/x", "/y"), "/z", f"federation.strategy={name}", *PRIVATE))
    plain = make_strategy(fed_config(("/x", "/y"), "/z", f"federation.strategy={name}", "federation.min_fit_clients=1"))
    global_arrays = models(1, seed=6)[0]
    for strategy in (ours, plain):
        start(strategy, global_arrays)
    ours.global_arrays, ours.num_sampled, ours.privacy.rng = global_arrays, 3, np.random.default_rng(11)
    expected, _ = private_mean(clients, global_arrays, 0.5, 1.3, 3, np.random.default_rng(11))
    a, _ = ours.aggregate_train(1, [reply(k, c, s) for k, (c, s) in enumerate(zip(clients, sizes))])
    b, _ = plain.aggregate_train(1, [reply(0, expected, 1)])
    for key in SHAPES:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    figures = ours.train_report.privacy
    assert figures["epsilon"] > 0 and figures["noise_std"] == pytest.approx(1.3 * 0.5 / 3)
    assert figures["clients_summed"] == 3 and figures["sample_rate"] == 1.0


def test_flowers_fixedclipping_mod_clips_on_the_client():
    global_arrays, trained = models(1, seed=8)[0], models(1, seed=9)[0]
    big = {k: global_arrays[k] + 100 * trained[k] for k in SHAPES}

    def instruction(**config) -> Message:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in global_arrays.items()}),
                              "config": ConfigRecord({"server-round": 1, **config})})
        return Message(content=content, metadata=Metadata(run_id=0, message_id="m", src_node_id=0, dst_node_id=1,
                                                          reply_to_message_id="", group_id="1", created_at=0.0,
                                                          ttl=60.0, message_type="train"))

    def local_training(msg: Message, context) -> Message:  # the client's training: a large update
        return reply(0, big, 4)

    clipped = client_clipping_mod(instruction(clipping_norm=0.5), None, local_training)
    update = minus({k: a.numpy() for k, a in clipped.content["arrays"].items()}, global_arrays)
    assert flat_norm(update) == pytest.approx(0.5, rel=1e-5)
    untouched = client_clipping_mod(instruction(), None, local_training)  # privacy.clipping=server: no norm sent
    assert all(np.array_equal(untouched.content["arrays"][k].numpy(), big[k]) for k in SHAPES)


def test_the_ledger_survives_a_checkpoint_and_refuses_another_delta(tmp_path):
    cfg = fed_config(("/x", "/y"), "/z", *PRIVATE)
    ledger = make_strategy(cfg)
    for _ in range(2):
        ledger.privacy.accountant.compose(ledger.privacy.event())
    torch.save(ledger.state_dict(), tmp_path / "state.pt")
    restored = make_strategy(cfg)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.privacy.epsilon == ledger.privacy.epsilon > 0
    other = make_strategy(fed_config(("/x", "/y"), "/z", *PRIVATE, "privacy.delta=1e-6"))
    with pytest.raises(FederationError, match="privacy.delta"):
        other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))


def test_sampling_fewer_clients_accounts_without_replacement():
    full = make_strategy(fed_config(("/x", "/y"), "/z", *PRIVATE)).privacy
    some = make_strategy(fed_config(("/x", "/y"), "/z", *PRIVATE, "partition.num_clients=10",
                                    "federation.fraction_fit=0.3")).privacy
    assert not full.amplified and full.event().noise_multiplier == 1.3
    assert some.amplified and (some.sampled, some.population) == (3, 10)
    assert some.event().noise_multiplier == 1.3 / 2  # replace-one: one swapped update moves the sum by 2C
    unsampled = make_strategy(fed_config(("/x", "/y"), "/z", *PRIVATE, "privacy.noise_multiplier=0.65")).privacy
    for ledger in (full, some, unsampled):
        ledger.accountant.compose(ledger.event())
    # the secret 3-of-10 sample amplifies against the same 2C-sensitivity release without sampling; against
    # full participation at sensitivity C it can cost more (here 6.5 against 3.5): the 2C weighs more at small z
    assert 0 < some.epsilon < unsampled.epsilon and full.epsilon < some.epsilon


def test_a_sample_smaller_than_the_population_is_secret():
    from fedhubert.federation.server_app import sampling_seed

    for overrides, secret in (([], False), (["partition.num_clients=10", "federation.fraction_fit=0.3"], True)):
        cfg = fed_config(("/x", "/y"), "/z", *PRIVATE, *overrides)
        plain = fed_config(("/x", "/y"), "/z", *overrides)
        assert sampling_seed(plain, 3, make_strategy(plain)) == plain.seed * 100_003 + 3  # resumable sampling
        assert (sampling_seed(cfg, 3, make_strategy(cfg)) is None) == secret


@pytest.mark.parametrize("overrides, message", [
    (["privacy.noise_multiplier=0"], "'privacy.noise_multiplier' must be above 0 with privacy.enabled"),
    (["privacy.delta=0"], "'privacy.delta' must be in (0, 1)"),
    (["federation.aggregation=median"], "federation.aggregation is median, but privacy.enabled"),
    (["privacy.clipping=client", "federation.wire_dtype=float16"], "privacy.clipping=client needs federation.wire_dtype"),
    (["privacy.clipping=everywhere"], "'privacy.clipping' must be one of server, client"),
])
def test_bad_privacy_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        fed_config(("/x", "/y"), "/z", *PRIVATE, *overrides)


def test_a_run_without_privacy_cannot_be_resumed_with_it(tiny_pretraining, federated_partitions, tmp_path):
    from fedhubert.federation.server_app import run_server

    shutil.copytree(tiny_pretraining[0].federation.checkpoint_dir, tmp_path / "ckpt")
    cfg = fed_config(federated_partitions, tmp_path / "ckpt", "federation.num_rounds=3", *PRIVATE)
    with pytest.raises(FederationError, match="trained without privacy.enabled"):
        run_server(None, cfg, resume=True)  # refused before any message is sent


def test_epsilon_grows_every_round_and_the_run_stops_at_its_budget(federated_partitions, tmp_path):
    from fedhubert.federation.simulation import run_federated_pretraining

    # adaptive clipping on the clients (Flower's adaptiveclipping_mod in the real ClientApp): the ledger still
    # composes the configured z, so the budget arithmetic below is the fixed-clipping one
    base = [*PRIVATE, "privacy.clipping=client", "privacy.clipping_norm=0.1", "federation.num_rounds=3",
            "privacy.adaptive_clipping=true"]
    ledger = make_strategy(fed_config(federated_partitions, tmp_path / "x", *base)).privacy
    epsilons = []
    for _ in range(3):
        ledger.accountant.compose(ledger.event())
        epsilons.append(ledger.epsilon)
    budget = (epsilons[1] + epsilons[2]) / 2  # rounds 1 and 2 fit, round 3 would not
    cfg = fed_config(federated_partitions, tmp_path / "ckpt", *base, f"privacy.max_epsilon={budget}")
    result = run_federated_pretraining(cfg)
    history = result["history"]
    assert result["stop_reason"] == "privacy.max_epsilon" and [r["round"] for r in history] == [0, 1, 2]
    spent = [r["privacy"]["epsilon"] for r in history[1:]]
    assert spent == pytest.approx(epsilons[:2]) and spent[0] < spent[1] <= budget
    for record in history[1:]:  # the clients clipped at the round's C: no update arrives above it
        figures = record["privacy"]
        assert figures["clipped_on_server"] == 0 and figures["update_norm_max"] <= figures["clipping_norm"] * 1.001
        assert "norm_bit" not in record["train"] and all("norm_bit" not in m for m in record["client_train"].values())
    assert history[1]["privacy"]["clipping_norm"] == 0.1 and history[1]["privacy"]["update_norm_max"] > 0.0999
    assert history[2]["privacy"]["clipping_norm"] == history[1]["privacy"]["next_clipping_norm"] != 0.1
    server = tmp_path / "ckpt" / "server"
    assert sorted(p.name for p in server.glob("round_*.pt")) == ["round_0.pt", "round_1.pt", "round_2.pt"]
    last = torch.load(server / "round_2.pt", weights_only=True)  # the last checkpoint is intact
    assert len(last["strategy_state"]["privacy"]["compositions"]) == 2  # the ledger of rounds 1 and 2
    assert last["strategy_state"]["privacy"]["clipping_norm"] == history[2]["privacy"]["next_clipping_norm"]
    assert not (server / "round_3.pt").exists()
