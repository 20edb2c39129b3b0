"""Federated pretraining end to end on the bundled real speech: partition (3 clients) -> k-means targets
-> Flower simulation of a tiny HuBERT. Checkpoints, metrics, resume equivalence, fault tolerance, and
that the client-specific prediction heads are never aggregated."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import app_for_ray_workers, fed_config
from fedhubert.config import Config
from fedhubert.errors import FederationError
from fedhubert.evaluate import check_s3prl_load
from fedhubert.federation.simulation import run_federated_pretraining
from fedhubert.federation.task import build_model, is_head_param, split_state


@pytest.fixture(scope="module")
def partitions(federated_partitions) -> tuple[Path, Path]:
    return federated_partitions


@pytest.fixture(scope="module")
def two_rounds(tiny_pretraining) -> tuple[Config, dict]:
    return tiny_pretraining


def read_history(cfg: Config) -> list[dict]:
    lines = (Path(cfg.federation.checkpoint_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_two_rounds_write_checkpoints_metrics_and_learn(two_rounds):
    cfg, result = two_rounds
    out = Path(cfg.federation.checkpoint_dir)
    server = out / "server"
    for name in ("round_0.pt", "round_1.pt", "round_2.pt", "best_global_model.pt",
                 "best_global_model_hf/config.json"):
        assert (server / name).is_file(), name
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    history = read_history(cfg)
    assert [r["round"] for r in history] == [0, 1, 2] == [r["round"] for r in result["history"]]
    for record in history:
        for split in ("train", "val"):
            assert all(math.isfinite(v) for v in record[split].values()), record
    assert history[2]["val"]["loss"] < history[0]["val"]["loss"]
    assert history[1]["clients_succeeded"] == 3 and history[1]["clients_failed"] == 0

    # Every checkpoint is plain data (weights_only) and s3prl's hubert_local loads the best one.
    for path in server.glob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=True)
    assert check_s3prl_load(cfg) == cfg.model.num_hidden_layers + 1


def test_weights_travel_as_float32_encoder_only(two_rounds):
    cfg, _ = two_rounds
    encoder, _ = split_state(build_model(cfg))
    fp32_bytes = sum(t.numel() * 4 for t in encoder.values())
    record = read_history(cfg)[1]
    assert record["bytes_sent_per_client"] == fp32_bytes
    assert set(record["bytes_received_per_client"].values()) == {fp32_bytes}


def test_server_never_aggregates_the_prediction_heads(two_rounds):
    cfg, _ = two_rounds
    initial = build_model(cfg).state_dict()
    saved = torch.load(Path(cfg.federation.checkpoint_dir) / "server" / "round_2.pt", weights_only=True)
    weights = saved["model_weight"]
    head_names = [k for k in weights if is_head_param(k)]
    assert head_names, "the checkpoint must carry a head for s3prl's strict load"
    for name in head_names:  # the server's head is the seeded initial one: nothing ever averaged into it
        assert torch.equal(weights[name], initial[name]), name
    assert not torch.equal(weights["encoder.layers.0.fc1.weight"], initial["encoder.layers.0.fc1.weight"])

    heads = [torch.load(Path(cfg.federation.checkpoint_dir) / "clients" / f"client_{k}" / "head_round_2.pt",
                        weights_only=True)["head"] for k in range(3)]
    for name in head_names:  # each client trained its own head
        assert not torch.equal(heads[0][name], initial[name])
        assert not torch.equal(heads[0][name], heads[1][name])
        assert not torch.equal(heads[1][name], heads[2][name])


def test_resume_extends_a_finished_run(two_rounds, partitions, tmp_path):
    """A finished 2-round run resumed with num_rounds=3 trains round 3 only. That a resume ends with an
    uninterrupted run's weights, bit for bit, is test_server_killed.py's (the server SIGKILLed mid-round)."""
    cfg2, _ = two_rounds
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(cfg2.federation.checkpoint_dir, resumed_dir)
    resumed = fed_config(partitions, resumed_dir, "federation.num_rounds=3")
    run_federated_pretraining(resumed, resume=True)
    before = torch.load(resumed_dir / "server" / "round_2.pt", weights_only=True)
    after = torch.load(resumed_dir / "server" / "round_3.pt", weights_only=True)
    original = torch.load(Path(cfg2.federation.checkpoint_dir) / "server" / "round_2.pt", weights_only=True)
    for name, tensor in original["model_weight"].items():
        assert torch.equal(before["model_weight"][name], tensor), name  # the resumed rounds were not retrained
    assert any(not torch.equal(after["model_weight"][n], t) for n, t in before["model_weight"].items())
    assert [r["round"] for r in read_history(resumed)] == [0, 1, 2, 3]


@pytest.fixture
def faulty_client_app(monkeypatch):
    return app_for_ray_workers(monkeypatch, "faulty_clients")


def test_failed_and_nan_clients_are_left_out(partitions, tmp_path, faulty_client_app):
    cfg = fed_config(partitions, tmp_path / "ckpt", "federation.num_rounds=2", "federation.min_fit_clients=1")
    result = run_federated_pretraining(cfg, client_app=faulty_client_app)
    history = result["history"]
    assert (history[1]["clients_succeeded"], history[1]["clients_failed"]) == (1, 2)
    assert (history[2]["clients_succeeded"], history[2]["clients_failed"]) == (2, 1)
    assert any("raised" in f and "planted failure" in f for f in history[1]["failures"])
    assert any("client 1" in f and "NaN" in f for f in history[2]["failures"])
    final = torch.load(tmp_path / "ckpt" / "server" / "round_2.pt", weights_only=True)["model_weight"]
    assert all(torch.isfinite(t).all() for t in final.values())


def test_too_few_successful_clients_stop_the_run(partitions, tmp_path, faulty_client_app):
    cfg = fed_config(partitions, tmp_path / "ckpt", "federation.num_rounds=2", "federation.min_fit_clients=3")
    with pytest.raises(FederationError, match="min_fit_clients"):
        run_federated_pretraining(cfg, client_app=faulty_client_app)
    server = tmp_path / "ckpt" / "server"
    assert sorted(p.name for p in server.glob("round_*.pt")) == ["round_0.pt"]
    torch.load(server / "round_0.pt", weights_only=True)  # the last good checkpoint is intact


def test_a_client_keeps_the_head_of_the_best_round(tmp_path):
    from fedhubert.federation.client_app import HeadStore

    store = HeadStore(tmp_path, keep=2, prefix="head")
    for rnd in range(1, 6):
        store.save(rnd, {"final_proj.weight": torch.full((2, 2), float(rnd))}, keep_round=2, targets_sha1="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head_round_2.pt", "head_round_4.pt", "head_round_5.pt"]
    assert float(store.latest(up_to=3)["final_proj.weight"][0, 0]) == 2.0  # read back from disk


def test_a_collapse_is_reported_and_never_becomes_the_best_model(partitions, tmp_path):
    # FedAdam with tau 1e-9 moves every weight by about eta per round: eta 0.1 wrecks the tiny encoder,
    # while the clients' own heads keep fitting (the validation loss alone would not show it).
    cfg = fed_config(partitions, tmp_path / "ckpt", "federation.num_rounds=3", "federation.eta=0.1",
                     "federation.tau=1e-9")
    result = run_federated_pretraining(cfg)
    history = result["history"]
    assert not history[0].get("collapsed")
    for record in history:
        for where in ("first", "mid", "last"):
            assert record["val"][f"health_rank_{where}"] > 0 and -1 <= record["val"][f"health_cos_{where}"] <= 1
        assert 0 < record["val"]["masked_chance"] < 1
    collapsed = [r["round"] for r in history if r.get("collapsed")]
    assert collapsed, [(r["round"], {k: v for k, v in r["val"].items() if k.startswith("health")}) for r in history]
    assert result["best_round"] not in collapsed
    best = Path(cfg.federation.checkpoint_dir) / "server" / "best_global_model.pt"
    assert not best.exists() or torch.load(best, weights_only=True)["round"] not in collapsed

    stop = fed_config(partitions, tmp_path / "stop", "federation.num_rounds=3", "federation.eta=0.1",
                      "federation.tau=1e-9", "federation.stop_on_collapse=true")
    stopped = run_federated_pretraining(stop)["history"]
    assert stopped[-1]["round"] == collapsed[0] and stopped[-1]["collapsed"]  # stopped at the first collapse
    assert (Path(stop.federation.checkpoint_dir) / "server" / f"round_{collapsed[0]}.pt").is_file()


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_every_strategy_saves_and_restores_its_server_state(name):
    import numpy as np

    from fedhubert.federation.strategy import make_strategy

    cfg = fed_config(("/x", "/y"), "/z", f"federation.strategy={name}")
    strategy = make_strategy(cfg)
    assert type(strategy).__name__.lower() == f"robust{name}"
    arrays = [np.full((2, 3), 0.5, dtype=np.float32), np.arange(4, dtype=np.float32)]
    if name == "fedavgm":
        strategy.momentum_vector = arrays
        assert strategy.server_momentum == cfg.federation.server_momentum
    elif name in ("fedadam", "fedyogi"):
        strategy.m_t, strategy.v_t = {"a": arrays[0]}, {"a": arrays[0] * 2}
        assert strategy.eta == cfg.federation.eta and strategy.tau == cfg.federation.tau
    state = strategy.state_dict()
    torch.save(state, "/dev/null")  # plain tensors: weights_only-loadable
    restored = make_strategy(cfg)
    restored.load_state_dict(state)
    for key in ("momentum_vector", "m_t", "v_t"):
        if hasattr(strategy, key):
            a, b = getattr(strategy, key), getattr(restored, key)
            pairs = zip(a, b) if isinstance(a, list) else ((a[k], b[k]) for k in a)
            assert all(np.array_equal(x, y) for x, y in pairs), key


def test_fedavgm_federates(partitions, tmp_path):
    cfg = fed_config(partitions, tmp_path / "ckpt", "federation.num_rounds=2", "federation.strategy=fedavgm",
                     "federation.eta=1.0")
    history = run_federated_pretraining(cfg)["history"]
    assert history[2]["clients_succeeded"] == 3 and history[2]["val"]["loss"] < history[0]["val"]["loss"]
    state = torch.load(tmp_path / "ckpt" / "server" / "round_2.pt", weights_only=True)["strategy_state"]
    assert len(state["momentum_vector"]) > 0


ROBUST_MARGIN = 1.05  # robust final val loss <= 1.05 x the clean run's (measured: 1.013 x for the median)
AGGREGATIONS = ["mean", "median", "trimmed_mean"]


@pytest.fixture(scope="module")
def attacked(partitions, tmp_path_factory) -> dict[str, list[dict]]:
    """{aggregation: history} of three 2-round runs against the same attacker, one after the other in one
    simulation (one Ray start instead of three): each is a whole run_server with its own checkpoint
    folder, and the clients' heads are found by their files in that folder (HeadStore), so no run sees
    another's."""
    from fedhubert.federation.server_app import run_server
    from fedhubert.federation.simulation import simulate

    root = tmp_path_factory.mktemp("attacked")
    cfgs = {a: fed_config(partitions, root / a, "federation.num_rounds=2", f"federation.aggregation={a}",
                          "federation.trim_fraction=0.34")  # 0.34 x 3 clients: one cut from each end
            for a in AGGREGATIONS}
    with pytest.MonkeyPatch.context() as patch:  # Ray's workers import faulty_clients from tests/
        patch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
        import faulty_clients
        runs = simulate(cfgs["mean"], lambda grid: {a: run_server(grid, cfg) for a, cfg in cfgs.items()},
                        faulty_clients.attack_app)
    return {a: run["history"] for a, run in runs.items()}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_one_attacker_wrecks_the_mean_but_not_a_robust_statistic(aggregation, two_rounds, attacked):
    # Client 0 of 3 sends a sign-flipped update boosted x10; FedAdam (the default) steps from the aggregate.
    # Measured (val loss after 2 rounds, round 0: 12.11): clean 9.21, mean 30.96, median 9.33.
    clean = two_rounds[1]["history"]
    history = attacked[aggregation]
    final, clean_final = history[2]["val"]["loss"], clean[2]["val"]["loss"]
    if aggregation == "mean":  # worse than the untrained model, and more than twice the clean run's loss
        assert final > history[0]["val"]["loss"] and final > 2 * clean_final, (final, clean_final)
    else:
        assert final <= ROBUST_MARGIN * clean_final, (final, clean_final)
