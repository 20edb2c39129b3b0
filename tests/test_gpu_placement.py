"""Simulated clients placed on GPUs by reservation (issue 12), checked on a CPU machine: the resources and
environment the simulation hands Flower and Ray for a given GPU count, the refusals, the batch_size=auto
budget of a client sharing a GPU, and Ray itself giving each reserving actor its own GPU (Ray's GPUs
can be declared on a machine without any)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from fedhubert.config import load_config
from fedhubert.errors import ConfigError
from fedhubert.federation import simulation
from fedhubert.federation.simulation import backend_config, client_resources, ray_env
from fedhubert.memory import memory_budget

GiB = 2**30


def cfg_with(*overrides: str):  # noqa: ANN201
    return load_config(None, list(overrides))


@pytest.mark.parametrize("overrides, gpus, expected", [
    ((), 0, 0.0),                                            # auto on a CPU machine: no GPU
    ((), 2, 1.0),                                            # auto with GPUs: one each, Ray runs one per GPU
    (("training.device=cuda",), 1, 1.0),
    (("training.device=cpu",), 4, 0.0),                      # auto for a CPU run on a GPU machine
    (("federation.client_num_gpus=0.5",), 1, 0.5),           # two clients per GPU
    (("federation.client_num_gpus=0.25", "training.device=cuda:0"), 2, 0.25),
    (("federation.client_num_gpus=0", "training.device=cpu"), 2, 0.0),
    (("federation.client_num_gpus=0",), 0, 0.0),
])
def test_client_resources_from_the_config(overrides: tuple[str, ...], gpus: int, expected: float) -> None:
    cfg = cfg_with("federation.client_num_cpus=2", *overrides)
    resources = client_resources(cfg, gpus)
    assert resources == {"num_cpus": 2.0, "num_gpus": expected}
    assert all(isinstance(v, float) for v in resources.values())  # Flower accepts int or float only
    backend = backend_config(resources, gpus)
    assert backend["client_resources"] == resources and backend["init_args"]["num_gpus"] == gpus
    env = ray_env(resources)
    # no GPU reserved: Ray leaves CUDA_VISIBLE_DEVICES alone; reserved: Ray sets it, and the flag is not passed
    assert ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" in env) == (expected == 0)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


@pytest.mark.parametrize("overrides, gpus, key", [
    (("federation.client_num_gpus=0",), 2, "federation.client_num_gpus is 0"),           # would pile on cuda:0
    (("federation.client_num_gpus=0", "training.device=cuda"), 1, "federation.client_num_gpus is 0"),
    (("federation.client_num_gpus=0.5",), 0, "federation.client_num_gpus is 0.5"),       # no GPU to reserve
    (("federation.client_num_gpus=1", "training.device=cpu"), 0, "federation.client_num_gpus is 1"),
    (("training.device=cuda:1",), 2, "training.device is cuda:1"),                          # clients see one GPU
])
def test_placements_that_cannot_work_are_one_line_config_errors(overrides: tuple[str, ...], gpus: int,
                                                               key: str) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        client_resources(cfg_with(*overrides), gpus)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", ["1.5", "-0.5", "half"])
def test_client_num_gpus_outside_auto_and_0_to_1_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="federation.client_num_gpus"):
        cfg_with(f"federation.client_num_gpus={value}")


def test_run_federated_refuses_before_reading_or_writing_anything(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 2)
    cfg = cfg_with(f"data.partitions_dir={tmp_path / 'none'}", f"federation.checkpoint_dir={tmp_path / 'ckpt'}",
                   "federation.client_num_gpus=0")
    for run in (lambda: simulation.run_federated("pretraining", cfg), lambda: simulation.run_federated_kmeans(cfg)):
        with pytest.raises(ConfigError, match="client_num_gpus"):  # not the missing partitions
            run()
    assert list(tmp_path.iterdir()) == []


def test_simulate_hands_flower_the_resolved_resources_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.simulation

    seen: list[tuple[dict, str | None]] = []

    class Stop(Exception):
        pass

    def fake_run_simulation(*, backend_config, **_kwargs):  # noqa: ANN001, ANN003
        seen.append((backend_config, os.environ.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")))
        raise Stop

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    for gpus, overrides, num_gpus, flag in ((2, (), 1.0, None), (1, ("federation.client_num_gpus=0.5",), 0.5, None),
                                            (0, (), 0.0, "0")):
        monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
        monkeypatch.setattr(simulation, "visible_gpus", lambda gpus=gpus: gpus)
        with pytest.raises(Stop):
            simulation.simulate(cfg_with(*overrides), lambda grid: {}, client_app=None)
        backend, env_flag = seen[-1]
        assert backend["client_resources"]["num_gpus"] == num_gpus and backend["init_args"]["num_gpus"] == gpus
        assert env_flag == flag


def test_auto_batch_budget_of_a_client_sharing_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    free = {"bytes": 80 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * GiB))
    cuda = torch.device("cuda")
    assert memory_budget(cfg_with(), cuda) == 40 * GiB                                  # a GPU of its own: half the free
    half = cfg_with("federation.client_num_gpus=0.5")
    assert memory_budget(half, cuda) == 20 * GiB                                        # half of its half
    free["bytes"] = 50 * GiB  # the other client on this GPU already holds 30 GiB
    assert memory_budget(half, cuda) == 20 * GiB                                        # its share, not the rest
    free["bytes"] = 30 * GiB
    assert memory_budget(half, cuda) == 15 * GiB                                        # never above what is free
    assert memory_budget(cfg_with("federation.client_num_gpus=0.25"), cuda) == 10 * GiB      # 80 x 0.25 / 2
    assert memory_budget(cfg_with("federation.client_num_gpus=0.5", "training.memory_budget_gb=3"), cuda) == 3 * GiB


def test_ray_gives_every_gpu_reserving_actor_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the placement relies on, with 2 GPUs declared to Ray: Flower's pool holds one client per GPU
    (two per GPU at 0.5), and Ray sets each actor's CUDA_VISIBLE_DEVICES to its GPU, even with
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 exported (as setup_env.sh does). A whole GPU per actor takes the
    same path (four actors here: each starts a process, the cost of this test)."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def visible(self) -> str | None:
                return os.environ.get("CUDA_VISIBLE_DEVICES")

        whole = client_resources(cfg_with(), 2)
        shared = client_resources(cfg_with("federation.client_num_gpus=0.5"), 2)
        assert pool_size_from_resources(whole) == 2 and pool_size_from_resources(shared) == 4
        # the pool Flower builds at 0.5: two actors on each GPU, each seeing that one alone (as its cuda:0)
        actors = [Probe.options(num_gpus=shared["num_gpus"]).remote() for _ in range(4)]
        assert sorted(ray.get([a.visible.remote() for a in actors])) == ["0", "0", "1", "1"]
    finally:
        ray.shutdown()
