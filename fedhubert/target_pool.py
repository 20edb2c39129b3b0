"""generate_kmeans_targets.py with kmeans.codebook=local on many clients: clients are independent (each
reads and writes its own folder only), so :func:`all_client_targets` fits and labels them in a pool of
processes, one torch and one BLAS/OpenMP thread each (kmeans.workers)."""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from fedhubert.config import Config
from fedhubert.data import read_manifest
from fedhubert.features import HubertFeatures, MfccFeatures, feature_threads, make_features
from fedhubert.partition import SPLITS, client_dir
from fedhubert.targets import client_targets

log = logging.getLogger(__name__)

_WORKER_LIMITS: list[Any] = []  # a worker's BLAS/OpenMP limit, kept alive for the worker's lifetime


def _worker_init(log_level: int) -> None:
    """A target worker process: one torch and one BLAS/OpenMP thread (the workers share the cores: more
    threads each would only contend), and the parent's log level (a fresh process has no logging set up)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    _WORKER_LIMITS.append(threadpool_limits(1))


def _worker_client(cfg: Config, k: int) -> dict:
    return client_targets(cfg, k, make_features(cfg), progress=False)


# kmeans.workers 0 starts processes only for this much audio: the pool's start (its server imports torch,
# ~4 s; 15-20 s on a busy 2-core machine) costs more than it saves on less (bench_data.py: workers)
POOL_MIN_AUDIO_S = 7200.0


def target_workers(cfg: Config, features: MfccFeatures | HubertFeatures, ids: list[int]) -> int:
    """Processes for the local k-means, at most one per client: kmeans.workers, or for 0 the cores once
    the clients hold :data:`POOL_MIN_AUDIO_S` of audio; 1 with hubert features (a model forward uses
    every core itself, and each worker would hold its own copy of the model)."""
    if not isinstance(features, MfccFeatures):
        return 1
    workers = cfg.kmeans.workers
    if workers == 0:
        samples = sum(sum(read_manifest(client_dir(cfg.data.partitions_dir, k) / f"{s}.tsv")[2])
                      for k in ids for s in SPLITS)
        workers = (os.cpu_count() or 1) if samples >= POOL_MIN_AUDIO_S * cfg.data.sample_rate else 1
    return max(1, min(workers, len(ids)))


def all_client_targets(cfg: Config, ids: list[int], features: MfccFeatures | HubertFeatures) -> list[dict]:
    """:func:`client_targets` of every client in ``ids``, in order; with :func:`target_workers` > 1 in a
    pool of processes (clients are independent: each reads and writes its own folder only). The first
    error, e.g. a DataError naming a client's file, stops the pool and is raised as it was raised."""
    workers = target_workers(cfg, features, ids)
    if workers == 1:
        with feature_threads(features):
            return [client_targets(cfg, k, features) for k in ids]
    # forkserver: a clean child (fork would copy this process's torch/OpenMP thread state, which can hang
    # a child); the preload imports torch once in the server instead of once per worker.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    log.info("k-means targets of %d clients in %d processes (kmeans.workers)", len(ids), workers)
    infos: dict[int, dict] = {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        futures = [pool.submit(_worker_client, cfg, k) for k in ids]
        for future in tqdm(as_completed(futures), total=len(ids), desc="clients labelled", unit="client"):
            if future.exception() is not None:
                for other in futures:
                    other.cancel()  # those not started yet; a running one finishes its client
                raise future.exception()
            infos[future.result()["client"]] = future.result()
    return [infos[k] for k in ids]
