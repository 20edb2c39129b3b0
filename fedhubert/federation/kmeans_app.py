"""Federated k-means as a Flower app: one codebook for all clients (``kmeans.codebook: federated``), of
the features ``kmeans.features`` selects (MFCC, or a HuBERT checkpoint's layer: features.make_features),
fitted on ``kmeans.percent`` of each client's training utterances (targets.fitting_utterances).

The ServerApp sends three kinds of message, each answered by the ClientApp below; no frame ever
leaves a client (fedkmeans.py has the algorithm and its guarantees):

- ``train.kmeans_init`` (every client): the client streams its train split's frames, keeps a
  uniform sample of at most :data:`INIT_MAX_FRAMES`, fits a local k-means of ``kmeans.k_local``
  centres (0 = n_clusters) and returns only those centres and their counts (k-FED); the server
  seeds the codebook from the pooled centres (:func:`fedkmeans.initial_codebook`).
- ``train.kmeans_stats`` (the sampled clients, every round): the client assigns its train frames to
  the codebook and returns its :class:`ClusterStats` only: float32 sums, counts, inertia and frame
  count (:func:`fedkmeans.message_bytes`). The server applies ``lloyd_update`` or
  ``minibatch_update`` and stops when ``converged`` (``kmeans.tol``) or after ``kmeans.max_rounds``.
- ``query.kmeans_label`` (every client): the client labels its train and valid splits with the
  final codebook and writes its own ``train.km``/``valid.km`` (targets.label_files): the server
  writes no client file.

Deployment: the project's one ClientApp (client_app.py) answers these messages too, and its ServerApp
runs :func:`run_kmeans_server` for ``task = "kmeans"``, so ``flwr run . --run-config 'task="kmeans"'``
needs no other app declaration; ``clientapp`` here is the same handlers alone.

Every reply goes through the checks pretraining's replies go through (replies.screen, against
:func:`_expected`: records, array names, shapes and dtypes from their headers before any array is
read, integer metrics, one reply per node and partition, no late reply), then its numbers are checked
(finite, non-negative counts that add up). A client that raises, times out or fails a check is left out
of that step with a warning and its reason in kmeans_metrics.jsonl's ``failures``; a step goes on while
``federation.min_fit_clients`` succeed, else the run stops with one line naming every failure; the
initialisation and the labelling go to all ``partition.num_clients`` clients, and labelling needs every
one of them. The server writes ``kmeans_metrics.jsonl`` (one line per round, rewritten whole: a rerun
never appends to an earlier run's), and once every client has labelled its splits ``codebook.npy`` and
``targets.json`` (targets.write_targets), under ``data.partitions_dir``, and one console line per round.
A run first removes an earlier run's ``codebook.npy`` and ``targets.json``: a run that fails leaves
neither, so no training stage pairs its labels with another run's codebook (targets.check_codebook
refuses).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedhubert import fedkmeans
from fedhubert.config import Config
from fedhubert.data import derive_seed
from fedhubert.errors import DataError, FederationError
from fedhubert.federation.metrics import write_jsonl
from fedhubert.federation.replies import Dim, Sent, screen, timed_out
from fedhubert.federation.sampling import PartitionOrder
from fedhubert.federation.strategy import RoundReport, all_finite
from fedhubert.federation.task import absolutize_paths, client_data_dir, config_from_record, config_record, payload_bytes
from fedhubert.fileio import atomic_open
from fedhubert.partition import KMEANS_METRICS_FILE, SPLITS
from fedhubert.fileio import file_sha1
from fedhubert.features import feature_threads, make_features
from fedhubert.targets import (CODEBOOK_FILE, TARGETS_FILE, SplitFrames, cluster_count, fitting_utterances, label_files,
                               targets_record, write_targets)

log = logging.getLogger(__name__)

INIT_MAX_FRAMES = 20_000  # frames of a client's uniform sample for its local k-FED k-means
METRICS_FILE = KMEANS_METRICS_FILE  # one line per round, under data.partitions_dir
INIT, STATS, LABEL = "train.kmeans_init", "train.kmeans_stats", "query.kmeans_label"


# --- the wire ------------------------------------------------------------------------------------

def init_record(centres: np.ndarray, counts: np.ndarray) -> ArrayRecord:
    """A client's k-FED reply: its float32 local centres and their int64 counts."""
    return ArrayRecord({"centres": Array(centres.astype(np.float32)), "counts": Array(counts.astype(np.int64))})


def stats_record(stats: fedkmeans.ClusterStats) -> ArrayRecord:
    """A client's round reply: float32 sums, int64 counts, float64 inertia, int64 frame count."""
    return ArrayRecord({"sums": Array(stats.sums.astype(np.float32)), "counts": Array(stats.counts.astype(np.int64)),
                        "inertia": Array(np.array([stats.inertia], np.float64)),
                        "num_frames": Array(np.array([stats.num_frames], np.int64))})


def stats_from_record(record: ArrayRecord) -> fedkmeans.ClusterStats:
    """The statistics of a reply whose arrays passed :func:`_expected` (names, shapes, dtypes), in
    float64; ValueError (the reason) when they are unusable."""
    a = {name: record[name].numpy() for name in ("sums", "counts", "inertia", "num_frames")}
    stats = fedkmeans.ClusterStats(a["sums"].astype(np.float64), a["counts"].astype(np.int64),
                                   float(a["inertia"][0]), int(a["num_frames"][0]))
    if not all_finite([stats.sums, stats.inertia]):
        raise ValueError("statistics contain NaN/Inf")
    if (stats.counts < 0).any() or stats.num_frames < 0 or stats.inertia < 0:
        raise ValueError(f"negative statistics (counts down to {stats.counts.min()}, num_frames {stats.num_frames}, "
                         f"inertia {stats.inertia:g})")
    if stats.counts.sum() != stats.num_frames:
        raise ValueError(f"counts (sum {stats.counts.sum()}) do not add up to num_frames {stats.num_frames}")
    return stats


def codebook_record(codebook: np.ndarray) -> ArrayRecord:
    """The codebook going to the clients, in float64: they label with exactly what codebook.npy holds."""
    return ArrayRecord({"codebook": Array(np.asarray(codebook, np.float64))})


# --- the ClientApp -------------------------------------------------------------------------------

class CodebookLabels:
    """``predict`` as a fitted k-means has it (targets.write_labels): every frame's nearest codeword."""

    def __init__(self, codebook: np.ndarray) -> None:
        self.codebook = codebook

    def predict(self, frames: np.ndarray) -> np.ndarray:
        return fedkmeans.assign(self.codebook, frames)


def _client(msg: Message, context: Context) -> tuple[Config, int, Path]:
    cfg = config_from_record(msg.content["config"])
    pid = int(context.node_config["partition-id"])
    return cfg, pid, client_data_dir(cfg, pid, context.node_config)


def _splits(cfg: Config, data_dir: Path, splits: tuple[str, ...] = ("train",)) -> dict[str, SplitFrames]:
    features = make_features(cfg)
    return {s: SplitFrames(data_dir / f"{s}.tsv", features, cfg.data.sample_rate) for s in splits}


def _utterances(frames: SplitFrames, indices: Iterable[int]) -> Iterator[np.ndarray]:
    """The frames of utterances ``indices``, one utterance at a time: memory stays flat whatever the split's size."""
    return (frames.utterance(int(i)) for i in indices)


def _reply(msg: Message, metrics: dict[str, int | float], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


clientapp = ClientApp()


@clientapp.train("kmeans_init")
def kmeans_init(msg: Message, context: Context) -> Message:
    cfg, pid, data_dir = _client(msg, context)
    train, seed = _splits(cfg, data_dir)["train"], derive_seed(cfg.seed, "kmeans", pid)
    fit = fitting_utterances(cfg, train.sizes, pid)
    with feature_threads(train.features):
        sample = fedkmeans.reservoir_sample(_utterances(train, fit), INIT_MAX_FRAMES,
                                            np.random.default_rng(derive_seed(seed, "sample")))
    centres, counts = fedkmeans.local_centres(sample, cfg.kmeans.k_local or cfg.kmeans.n_clusters, seed, INIT_MAX_FRAMES)
    arrays = init_record(centres, counts)
    # num-frames: the frames this client fits on (kmeans.percent of its train-frames), which set K
    return _reply(msg, {"partition-id": pid, "num-frames": train.frames_of(fit), "train-frames": train.num_frames},
                  arrays)


@clientapp.train("kmeans_stats")
def kmeans_stats(msg: Message, context: Context) -> Message:
    cfg, pid, data_dir = _client(msg, context)
    codebook = msg.content["arrays"]["codebook"].numpy()
    train = _splits(cfg, data_dir)["train"]
    with feature_threads(train.features):
        stats = fedkmeans.client_stats(codebook, _utterances(train, fitting_utterances(cfg, train.sizes, pid)))
    return _reply(msg, {"partition-id": pid}, stats_record(stats))


@clientapp.query("kmeans_label")
def kmeans_label(msg: Message, context: Context) -> Message:
    cfg, pid, data_dir = _client(msg, context)
    splits = _splits(cfg, data_dir, SPLITS)
    with feature_threads(splits["train"].features), label_files(CodebookLabels(msg.content["arrays"]["codebook"].numpy()), splits, data_dir):
        pass
    # a per-client k-means of an earlier kmeans.codebook=local run: its ids are not these ones
    (data_dir / "kmeans.joblib").unlink(missing_ok=True)
    return _reply(msg, {"partition-id": pid, "train-frames": splits["train"].num_frames,
                        "train-utterances": len(splits["train"]), "valid-utterances": len(splits["valid"])})


# --- the ServerApp -------------------------------------------------------------------------------

def _expected(message_type: str, rnd: int, nodes: list[int], k_local: int, n_clusters: int, dim: int) -> Sent:
    """What every reply of one step must be (replies.screen checks it before anything is decoded): the
    arrays and integer metrics our ClientApp above sends, their sizes bounded by the codebook's."""
    arrays: dict[str, tuple[tuple[Dim, ...], str]] = {}
    counts: tuple[str, ...] = ("num-frames", "train-frames")
    if message_type == INIT:  # a client with fewer distinct frames than k_local sends fewer centres
        arrays = {"centres": ((range(1, k_local + 1), dim), "float32"), "counts": ((range(1, k_local + 1),), "int64")}
    elif message_type == STATS:
        arrays, counts = {"sums": ((n_clusters, dim), "float32"), "counts": ((n_clusters,), "int64"),
                          "inertia": ((1,), "float64"), "num_frames": ((1,), "int64")}, ()
    else:
        counts = ("train-frames", "train-utterances", "valid-utterances")
    return Sent(rnd, message_type, nodes, arrays, weight=None, counts=counts, dtype_source="kmeans_app's wire format")


def _exchange(grid: Grid, cfg: Config, sent: Sent, arrays: ArrayRecord | None, parse: Callable[[Message], Any],
              need: int, what: str) -> tuple[dict[int, Any], RoundReport]:
    """Sends one message to each of ``sent.nodes`` (its config: the run's and ``server-round`` =
    ``sent.round``); returns {partition id: parse(reply)} of the good replies and the step's report. A
    reply that is an error, late, fails replies.screen's checks against ``sent``, or that ``parse``
    rejects (ValueError) is left out with a warning; FederationError when fewer than ``need`` are good."""
    report = RoundReport(sampled=len(sent.nodes))
    config = config_record(cfg, **{"server-round": sent.round})
    messages = []
    for node in sent.nodes:
        content = RecordDict({"config": config})
        if arrays is not None:
            content["arrays"] = arrays
            report.bytes_sent[node] = payload_bytes(arrays)
        # group_id: a reply carries it back, so a late one to an earlier step is recognised (replies.stale_reason)
        messages.append(Message(content=content, dst_node_id=node, message_type=sent.message_type,
                                group_id=str(sent.round)))
    sent.metadata = [m.metadata for m in messages]  # the Grid's push sets their ids (replies.stand_in_error)
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
    kept, answered = screen(replies, sent, report.failed, report.ignored)
    good: dict[int, Any] = {}
    for pid, msg in kept.items():
        if "arrays" in msg.content:
            report.bytes_received[pid] = payload_bytes(msg.content["arrays"])
        try:
            good[pid] = parse(msg)
        except ValueError as exc:
            report.failed.append((f"client {pid}", str(exc)))
    report.failed += timed_out(sent, answered, cfg.federation.round_timeout)
    for who, why in report.failed:
        log.warning("k-means %s: left out: %s: %s", what, who, why)
    for who, why in report.ignored:
        log.warning("k-means %s: %s: %s", what, who, why)
    report.succeeded = sorted(good)
    if len(good) < need:
        raise FederationError(f"k-means {what}: {len(good)} of {len(sent.nodes)} clients succeeded, {need} needed "
                              f"({'; '.join(f'{w}: {r}' for w, r in report.failed) or 'no replies'}); stopping")
    return dict(sorted(good.items())), report


def _parse_init(msg: Message) -> tuple[np.ndarray, np.ndarray, int]:
    """(centres, counts, fitted frames) of an initialisation reply that passed :func:`_expected`."""
    centres, counts = msg.content["arrays"]["centres"].numpy(), msg.content["arrays"]["counts"].numpy()
    if counts.shape != (len(centres),):
        raise ValueError(f"{len(centres)} local centres but {len(counts)} counts")
    if not all_finite([centres]):
        raise ValueError("local centres contain NaN/Inf")
    if (counts < 0).any():
        raise ValueError(f"local centres' counts are negative (down to {counts.min()})")
    return centres, counts, int(msg.content["metrics"]["num-frames"])


def _step(report: RoundReport, **values: Any) -> dict[str, Any]:
    """A kmeans_metrics.jsonl record: the step's figures and what its clients did and sent."""
    up = {str(pid): report.bytes_received.get(pid, 0) for pid in report.succeeded}
    return {**values, "clients_sampled": report.sampled, "clients_ok": len(report.succeeded),
            "clients_failed": len(report.failed), "failures": [f"{w}: {r}" for w, r in report.failed],
            "ignored": [f"{w}: {r}" for w, r in report.ignored],
            "bytes_up_per_client": up, "bytes_up_total": sum(up.values()),
            "bytes_down_per_client": next(iter(report.bytes_sent.values()), 0)}


def _line(r: dict[str, Any]) -> str:
    """The one console line per round."""
    head = (f"k-means init | {r['local_centres']} local centres -> codebook {r['n_clusters']} x {r['dim']}"
            if r["round"] == 0 else
            f"k-means round {r['round']} | inertia {r['inertia']:.6g} ({r['inertia_per_frame']:.4g} per frame) | "
            f"clusters used {r['clusters_used']}/{r['n_clusters']}, reseeded {r['reseeded']}")
    return (f"{head} | clients {r['clients_ok']}/{r['clients_sampled']} ok | up {r['bytes_up_total'] / 1024:.1f} KiB "
            f"({r['bytes_up_total'] / max(r['clients_ok'], 1) / 1024:.1f} per client) | {r['round_time_s']:.1f} s")


def run_kmeans_server(grid: Grid, cfg: Config) -> dict[str, Any]:
    """k-FED initialisation, federated Lloyd (or mini-batch) rounds, then every client labels its splits."""
    cfg = absolutize_paths(cfg)
    k, f = cfg.kmeans, cfg.federation
    out = Path(cfg.data.partitions_dir)
    features = make_features(cfg)
    dim, need = features.dim, f.min_fit_clients
    # An earlier run's codebook and record go first: written again once every client has labelled its
    # splits, so the folder never pairs this run's kmeans_metrics.jsonl or labels with another run's codebook
    for name in (TARGETS_FILE, CODEBOOK_FILE):
        if (out / name).exists():
            log.info("k-means: removing the earlier run's %s (written again when this run has finished)", out / name)
            (out / name).unlink()
    history: list[dict[str, Any]] = []

    def add(record: dict[str, Any], t0: float) -> None:
        record["round_time_s"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        write_jsonl(out / METRICS_FILE, history)
        log.info(_line(record))

    t0 = time.perf_counter()
    # Every client takes part in the initialisation and the labelling: wait for all of them to connect.
    _, nodes = sample_nodes(grid, cfg.partition.num_clients, 0)
    k_local = k.k_local or k.n_clusters
    local, report = _exchange(grid, cfg, _expected(INIT, 0, sorted(nodes), k_local, 0, dim), None, _parse_init, need,
                              "initialisation")
    total_frames = sum(frames for _, _, frames in local.values())  # the frames k-means is fitted on
    n_clusters = cluster_count(total_frames, cfg, "the clients together")
    try:
        codebook = fedkmeans.initial_codebook([c for c, _, _ in local.values()], n_clusters,
                                              derive_seed(cfg.seed, "kmeans-init"), [n for _, n, _ in local.values()])
    except ValueError as exc:
        raise DataError(f"k-means initialisation: {exc}") from None
    add(_step(report, round=0, n_clusters=n_clusters, dim=dim, fit_frames=total_frames,
              local_centres=sum(len(c) for c, _, _ in local.values())), t0)

    running, prev, converged = np.zeros(n_clusters, np.int64), None, False
    sampler = PartitionOrder(grid, f.round_timeout) if f.fraction_fit < 1 else grid  # the same clients in every run
    for rnd in range(1, k.max_rounds + 1):
        t0 = time.perf_counter()
        random.seed(derive_seed(cfg.seed, "kmeans-sample", rnd))  # Flower's sample_nodes draws with `random`
        size = min(len(nodes), max(need, int(len(nodes) * f.fraction_fit)))
        sampled, nodes = sample_nodes(sampler, f.min_available_clients, size)
        stats, report = _exchange(grid, cfg, _expected(STATS, rnd, sorted(sampled), k_local, n_clusters, dim),
                                  codebook_record(codebook), lambda m: stats_from_record(m.content["arrays"]), need,
                                  f"round {rnd}")
        total = sum(stats.values(), fedkmeans.ClusterStats.zeros(n_clusters, dim))
        if total.num_frames == 0:
            raise DataError(f"k-means round {rnd}: the clients {sorted(stats)} have no training frames")
        reseeded: list[int] = []
        if k.update == "lloyd":
            codebook, info = fedkmeans.lloyd_update(codebook, total, seed=derive_seed(cfg.seed, "kmeans-reseed", rnd))
            reseeded = info["reseeded"]
        else:
            codebook, running = fedkmeans.minibatch_update(codebook, running, total)
        per_frame = total.inertia / max(total.num_frames, 1)  # comparable when rounds see different clients
        add(_step(report, round=rnd, n_clusters=n_clusters, inertia=total.inertia, inertia_per_frame=per_frame,
                  num_frames=total.num_frames, clusters_used=int((total.counts > 0).sum()),
                  reseeded=len(reseeded)), t0)
        if fedkmeans.converged(prev, per_frame, k.tol):
            converged = True
            break
        prev = per_frame

    log.info("k-means: codebook %d x %d (%s after %d rounds); the clients label their splits", n_clusters, dim,
             "converged" if converged else "kmeans.max_rounds reached", len(history) - 1)
    _, nodes = sample_nodes(grid, cfg.partition.num_clients, 0)
    nodes = sorted(nodes)
    labelled, _ = _exchange(grid, cfg, _expected(LABEL, len(history), nodes, k_local, n_clusters, dim),
                            codebook_record(codebook), lambda m: dict(m.content["metrics"]), len(nodes), "labelling")
    clients = [{"client": pid, "n_clusters": n_clusters, "train_frames": int(m["train-frames"]),
                "train_utterances": int(m["train-utterances"]), "valid_utterances": int(m["valid-utterances"])}
               for pid, m in labelled.items()]
    log.info("k-means: clients %s wrote train.km and valid.km (%d clusters)", sorted(labelled), n_clusters)
    with atomic_open(out / CODEBOOK_FILE, "wb") as handle:  # only now: every client's labels are its ids
        np.save(handle, codebook)
    log.info("k-means: wrote %s", out / CODEBOOK_FILE)
    write_targets(out, targets_record(cfg, features), {pid: n_clusters for pid in labelled},
                  codebook_sha1=file_sha1(out / CODEBOOK_FILE))
    return {"codebook": str(out / CODEBOOK_FILE), "n_clusters": n_clusters, "converged": converged,
            "history": history, "clients": clients}
