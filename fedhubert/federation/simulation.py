"""Runs the ServerApp and ClientApp as a Flower simulation (``run_simulation``, Ray backend)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable

from fedhubert.config import NUM_SPECIAL_SYMBOLS, REPO_ROOT, Config
from fedhubert.errors import DataError

log = logging.getLogger(__name__)
# Flower and Ray read these at run time: no telemetry, no update check, no GPU masking on CPU hosts.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


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

    return simulate(cfg, lambda grid: run_kmeans_server(grid, cfg), client_app or default_client_app)


def simulate(cfg: Config, serve: Callable[[Any], dict[str, Any]], client_app: Any) -> dict[str, Any]:
    """Runs ``serve(grid)`` as the ServerApp's main and ``client_app`` on ``cfg.partition.num_clients``
    virtual SuperNodes (Ray backend, ``cfg.federation``'s client resources); returns what ``serve`` returned."""
    for key, value in FLOWER_ENV.items():
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

    f = cfg.federation
    backend_config = {
        "client_resources": {"num_cpus": f.client_num_cpus, "num_gpus": f.client_num_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                      "logging_level": logging.WARNING, "log_to_driver": True},
    }
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=cfg.partition.num_clients, backend_config=backend_config)
    if not result:
        raise RuntimeError("the simulation ended without a result from the ServerApp (see the log above)")
    return result
