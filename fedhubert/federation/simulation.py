"""Runs the ServerApp and ClientApp as a Flower simulation (``run_simulation``, Ray backend)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable

from fedhubert.config import NUM_SPECIAL_SYMBOLS, REPO_ROOT, Config
from fedhubert.errors import ConfigError, DataError

log = logging.getLogger(__name__)
# Flower reads these at run time: no telemetry, no update check.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def visible_gpus() -> int:
    """CUDA devices this process sees (those Ray will hand out to the clients)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def client_resources(cfg: Config, gpus: int) -> dict[str, float]:
    """Ray resources of one simulated client on a machine with ``gpus`` CUDA devices: federation.client_num_cpus
    cores and federation.client_num_gpus GPUs (auto: one when ``gpus`` and training.device is not cpu).

    A client that reserves a GPU sees only that one (Ray sets its CUDA_VISIBLE_DEVICES), as cuda:0. One that
    reserves none would see them all and, with training.device auto or cuda, train on cuda:0 beside every
    other client while the other GPUs idle: refused, as is a GPU reserved where none is (Ray's pool would
    be empty) and a cuda:N that a client's one visible GPU cannot be."""
    f, device = cfg.federation, cfg.training.device
    wants_gpu = device != "cpu"
    num_gpus = (1.0 if gpus and wants_gpu else 0.0) if f.client_num_gpus == "auto" else float(f.client_num_gpus)
    if num_gpus > 0 and not gpus:
        raise ConfigError(f"federation.client_num_gpus is {num_gpus:g} but no CUDA GPU is visible: "
                          "set it to auto or 0")
    if num_gpus == 0 and gpus and wants_gpu:
        raise ConfigError(f"federation.client_num_gpus is 0 but training.device is {device} and {gpus} CUDA GPU(s) "
                          "are visible: clients reserving no GPU would all train on cuda:0; set "
                          "federation.client_num_gpus to auto (a GPU each), a fraction such as 0.5 (two clients "
                          "per GPU), or training.device=cpu")
    if num_gpus > 0 and device not in ("auto", "cuda", "cuda:0"):
        raise ConfigError(f"training.device is {device}, but a simulated client sees only the GPU it reserves "
                          "(federation.client_num_gpus), as cuda:0: use auto or cuda")
    return {"num_cpus": f.client_num_cpus, "num_gpus": num_gpus}


def ray_env(resources: dict[str, float]) -> dict[str, str]:
    """The environment the simulation runs in. Clients that reserve no GPU (a CPU-only run) are left their
    CUDA_VISIBLE_DEVICES (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, Ray's coming default, which also silences
    its warning); a client reserving a GPU has it set by Ray to that GPU whatever this flag says."""
    if resources["num_gpus"] > 0:
        return dict(FLOWER_ENV)
    return {**FLOWER_ENV, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def check_partitions(cfg: Config) -> None:
    """Every client folder holds what the data stage writes, well formed (data.check_client_data: the
    manifests, their labels against model.vocab_size, the audio they list); else one error naming the
    file (and line). Runs before anything is written or Ray starts: inside a client the same error would
    only fail that client, round after round."""
    from fedhubert.data import check_client_data

    root = Path(cfg.data.partitions_dir)
    for k in range(cfg.partition.num_clients):
        for name in ("train.tsv", "train.km", "valid.tsv", "valid.km"):
            path = root / f"client_{k}" / name
            if not path.is_file():
                raise DataError(f"{path} is missing: run partition_data.py and generate_kmeans_targets.py "
                                f"with the same config (partition.num_clients={cfg.partition.num_clients})")
    for k in range(cfg.partition.num_clients):
        check_client_data(root / f"client_{k}", cfg.model.vocab_size - NUM_SPECIAL_SYMBOLS)


def run_federated_pretraining(cfg: Config, resume: bool = False, client_app: Any = None,
                              overwrite: bool = False) -> dict[str, Any]:
    """Trains ``cfg.partition.num_clients`` simulated clients for ``cfg.federation.num_rounds`` rounds."""
    return run_federated("pretraining", cfg, resume=resume, client_app=client_app, overwrite=overwrite)


def run_federated_distillation(cfg: Config, resume: bool = False, client_app: Any = None,
                               overwrite: bool = False) -> dict[str, Any]:
    """Distils ``cfg.distillation.teacher_model_path`` into a student for ``cfg.distillation.num_rounds`` rounds."""
    return run_federated("distillation", cfg, resume=resume, client_app=client_app, overwrite=overwrite)


def run_federated(task_name: str, cfg: Config, resume: bool = False, client_app: Any = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Runs one federated task as a simulation with ``cfg.partition.num_clients`` virtual SuperNodes.

    Everything that can be checked is checked before Ray starts: the partitions, the task's inputs, and
    the checkpoint folder (an earlier run there is refused, or moved aside with ``overwrite``; ``resume``
    needs a compatible run: rundir.py). ``client_app`` replaces the project's ClientApp (tests use it to
    inject faulty clients)."""
    from fedhubert.federation.rundir import prepare_checkpoint_dir
    from fedhubert.federation.task import absolutize_paths
    from fedhubert.federation.tasks import get_task

    task = get_task(task_name)
    client_resources(cfg, visible_gpus())  # where the clients will train, before anything is read or written
    check_partitions(cfg)
    task.preflight(cfg, resume=resume)  # e.g. the teacher and every client's teacher head, before anything is written
    if cfg.privacy.enabled:  # z from privacy.target_epsilon over the task's rounds (cached for the server), or why not
        from fedhubert.federation.privacy import sample_size
        from fedhubert.federation.privacy_accounting import noise_plan

        noise_plan(cfg.privacy, cfg.partition.num_clients, sample_size(cfg), task.num_rounds(cfg))
    checked = absolutize_paths(copy.deepcopy(cfg))  # as the server will see it (it compares saved absolute paths)
    prepare_checkpoint_dir(checked, task, task.check_label_space(checked), resume=resume, overwrite=overwrite)

    from fedhubert.federation.client_app import app as default_client_app
    from fedhubert.federation.server_app import run_server

    # the folder is ready: the server checks it again (a no-op now) before it writes
    return simulate(cfg, lambda grid: run_server(grid, cfg, resume=resume, task=task), client_app or default_client_app)


def run_federated_kmeans(cfg: Config, client_app: Any = None) -> dict[str, Any]:
    """kmeans.codebook=federated: one MFCC codebook for all clients by federated k-means (kmeans_app.py);
    every client writes its own train.km and valid.km. ``client_app`` replaces the k-means ClientApp."""
    from fedhubert.federation.client_app import app as default_client_app  # it answers k-means messages too
    from fedhubert.federation.kmeans_app import run_kmeans_server

    client_resources(cfg, visible_gpus())
    return simulate(cfg, lambda grid: run_kmeans_server(grid, cfg), client_app or default_client_app)


def backend_config(resources: dict[str, float], gpus: int) -> dict[str, Any]:
    """Flower's Ray backend config: each client's resources, and Ray given every core and the ``gpus``
    GPUs this process sees, so that it places clients on the same GPUs the checks above counted."""
    return {"client_resources": dict(resources),
            "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": gpus, "include_dashboard": False,
                          "logging_level": logging.WARNING, "log_to_driver": True}}


def simulate(cfg: Config, serve: Callable[[Any], dict[str, Any]], client_app: Any) -> dict[str, Any]:
    """Runs ``serve(grid)`` as the ServerApp's main and ``client_app`` on ``cfg.partition.num_clients``
    virtual SuperNodes (Ray backend, ``cfg.federation``'s client resources); returns what ``serve`` returned."""
    gpus = visible_gpus()
    resources = client_resources(cfg, gpus)
    for key, value in ray_env(resources).items():
        os.environ.setdefault(key, value)
    # Ray's worker processes import the apps: make the package importable there, wherever we run from.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # noqa: ANN001 - Flower's signature
        result.update(serve(grid))

    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=cfg.partition.num_clients, backend_config=backend_config(resources, gpus))
    if not result:
        raise RuntimeError("the simulation ended without a result from the ServerApp (see the log above)")
    return result
