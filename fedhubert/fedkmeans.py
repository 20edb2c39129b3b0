"""Federated k-means for HuBERT's MFCC targets: one codebook shared by all clients.

Clients never send a feature vector. At initialisation each sends the centres of a small local
k-means (k-FED, Dennis et al., ICML 2021); in each round it sends per-cluster sums and counts, its
inertia and its frame count (:class:`ClusterStats`). Summing those over clients gives exactly the
Lloyd step on the union of their data, so with every client sampled the result equals centralised
k-means started from the same centroids.

Wire convention (:func:`message_bytes`): sums travel as float32, counts/inertia/num_frames as
8-byte numbers. Clients accumulate in float64 and round once when sending (relative error ~6e-8
per sum, far below k-means' own noise); this in-process module keeps float64 throughout so that it
can be checked against scikit-learn exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from sklearn.cluster import KMeans

from fedhubert.errors import FederationError

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # rows per distance block: memory is CHUNK_ROWS x K, whatever the number of frames


def local_centres(frames: np.ndarray, k_local: int, seed: int,
                  max_frames: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Client side of k-FED: a seeded local k-means on (a sample of) ``frames``.

    Returns float32 centres ``[min(k_local, distinct frames), D]`` and int64 counts of the sampled
    frames each centre holds (optional weights for :func:`initial_codebook`)."""
    frames = np.asarray(frames)
    if frames.ndim != 2 or len(frames) == 0:
        raise ValueError(f"local_centres needs a non-empty [N, D] array, got shape {frames.shape}")
    rng = np.random.default_rng(seed)
    if len(frames) > max_frames:
        frames = frames[np.sort(rng.choice(len(frames), max_frames, replace=False))]
    # A client with fewer distinct frames than k_local sends fewer centres rather than duplicates.
    k = min(k_local, len(np.unique(frames, axis=0)))
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(frames.astype(np.float64))
    counts = np.bincount(km.labels_, minlength=k).astype(np.int64)
    return km.cluster_centers_.astype(np.float32), counts


def initial_codebook(all_centres: list[np.ndarray], k: int, seed: int,
                     counts: list[np.ndarray] | None = None) -> np.ndarray:
    """Server side of k-FED: k of the pooled local centres chosen by k-means++ (D^2) seeding.

    With ``counts`` the D^2 probabilities are weighted by how many frames each centre holds.
    Returns a float64 ``[k, D]`` codebook of k distinct pooled centres."""
    pooled = np.concatenate([np.asarray(c, np.float64) for c in all_centres])
    weights = np.ones(len(pooled)) if counts is None else np.concatenate(counts).astype(np.float64)
    pooled, inverse = np.unique(pooled, axis=0, return_inverse=True)
    weights = np.bincount(inverse.ravel(), weights=weights, minlength=len(pooled))
    if len(pooled) < k:
        raise ValueError(f"only {len(pooled)} distinct local centres were pooled from "
                         f"{len(all_centres)} clients, fewer than k={k}: lower k (or raise k_local)")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(len(pooled), p=weights / weights.sum()))]
    d2 = ((pooled - pooled[chosen[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        p = weights * d2  # chosen (and duplicate) centres have d2 == 0, so they cannot recur
        chosen.append(int(rng.choice(len(pooled), p=p / p.sum())))
        d2 = np.minimum(d2, ((pooled - pooled[chosen[-1]]) ** 2).sum(1))
    return pooled[chosen].copy()


def _nearest(codebook: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Labels of one chunk; ||x||^2 is dropped since it does not change the argmin."""
    c = np.asarray(codebook, np.float64)
    d = (c * c).sum(1) - 2.0 * (chunk @ c.T)
    return d.argmin(1).astype(np.int64)


def assign(codebook: np.ndarray, frames: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Nearest-centroid label (squared Euclidean) of every frame, int64 ``[N]``, chunk by chunk."""
    frames = np.asarray(frames)
    out = np.empty(len(frames), np.int64)
    for i in range(0, len(frames), chunk_rows):
        out[i:i + chunk_rows] = _nearest(codebook, frames[i:i + chunk_rows].astype(np.float64))
    return out


@dataclass
class ClusterStats:
    """Everything a client sends in a round: no frame, only K-sized aggregates."""

    sums: np.ndarray  # [K, D] float64: sum of the frames assigned to each cluster
    counts: np.ndarray  # [K] int64: number of frames assigned to each cluster
    inertia: float = 0.0  # sum of squared distances to the assigned centroid
    num_frames: int = 0

    @classmethod
    def zeros(cls, k: int, d: int) -> ClusterStats:
        """Statistics of no frame for a ``[k, d]`` codebook."""
        return cls(np.zeros((k, d), np.float64), np.zeros(k, np.int64))

    def add(self, codebook: np.ndarray, frames: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> ClusterStats:
        """Assign ``frames`` to their nearest centroid of ``codebook`` and accumulate; returns self."""
        c = np.asarray(codebook, np.float64)
        for i in range(0, len(frames), chunk_rows):
            x = np.asarray(frames[i:i + chunk_rows], np.float64)
            labels = _nearest(c, x)
            np.add.at(self.sums, labels, x)
            self.counts += np.bincount(labels, minlength=len(c))
            # Exact residuals rather than the expanded form, which can go slightly negative.
            self.inertia += float(((x - c[labels]) ** 2).sum())
            self.num_frames += len(x)
        return self

    def merge(self, other: ClusterStats) -> ClusterStats:
        """Pooled statistics of two disjoint sets of frames, as a new object."""
        return ClusterStats(self.sums + other.sums, self.counts + other.counts,
                            self.inertia + other.inertia, self.num_frames + other.num_frames)

    __add__ = merge


def message_bytes(k: int, d: int) -> int:
    """Bytes a client uploads per round: float32 sums, int64 counts, float64 inertia, int64 num_frames."""
    return 4 * k * d + 8 * k + 8 + 8


def client_stats(codebook: np.ndarray, frame_chunks: Iterable[np.ndarray]) -> ClusterStats:
    """A client's round: stream its chunks through :meth:`ClusterStats.add` (memory stays flat)."""
    stats = ClusterStats.zeros(*np.shape(codebook))
    for chunk in frame_chunks:
        stats.add(codebook, chunk)
    return stats


def lloyd_update(codebook: np.ndarray, stats: ClusterStats, seed: int) -> tuple[np.ndarray, dict]:
    """Exact Lloyd step on the union of the clients' data: centroid = pooled sum / pooled count.

    Empty-cluster rule (needs no frame): empty clusters are handled in index order; each splits
    the cluster that currently holds the most frames. It becomes that donor's new centroid plus a
    seeded random offset of length ``0.1 * sqrt(inertia / num_frames)`` (the RMS distance of a frame
    to its centroid); the donor's count is then halved so that several empty clusters spread over
    several big ones. The next round's assignment divides the donor's frames between the two.
    ``info``: ``reseeded`` (empty clusters), ``donors``, ``clusters_used``, ``inertia``."""
    if stats.num_frames == 0:
        raise ValueError("lloyd_update got statistics of zero frames")
    counts = stats.counts.astype(np.float64)
    new = np.asarray(codebook, np.float64).copy()
    used = counts > 0
    new[used] = stats.sums[used] / counts[used, None]
    reseeded, donors = [int(j) for j in np.flatnonzero(~used)], []
    if reseeded:
        rng = np.random.default_rng(seed)
        spread = max(np.sqrt(stats.inertia / stats.num_frames), 1e-6 * (1.0 + np.abs(new).max()))
        work = counts.copy()
        for j in reseeded:
            donor = int(work.argmax())
            direction = rng.standard_normal(new.shape[1])
            new[j] = new[donor] + 0.1 * spread * direction / np.linalg.norm(direction)
            work[donor] /= 2.0
            work[j] = work[donor]
            donors.append(donor)
    return new, {"reseeded": reseeded, "donors": donors, "clusters_used": int(used.sum()),
                 "inertia": stats.inertia}


def minibatch_update(codebook: np.ndarray, running_counts: np.ndarray,
                     stats: ClusterStats) -> tuple[np.ndarray, np.ndarray]:
    """Sculley-style step: per cluster c <- c + (sum - n*c) / (N_running + n), N_running += n.

    Each centroid is the mean of every frame ever assigned to it, so a round that sees only some
    clients moves it by their share. A cluster with no frames this round keeps its centroid."""
    c = np.asarray(codebook, np.float64).copy()
    n = stats.counts
    total = running_counts.astype(np.int64) + n
    hit = n > 0
    c[hit] += (stats.sums[hit] - n[hit, None] * c[hit]) / total[hit, None]
    return c, total


def converged(prev_inertia: float | None, inertia: float, tol: float) -> bool:
    """True when the relative inertia change is below ``tol`` (never on the first round)."""
    if prev_inertia is None:
        return False
    return abs(prev_inertia - inertia) / max(abs(prev_inertia), 1e-300) < tol


def reservoir_sample(chunks: Iterable[np.ndarray], max_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform sample of at most ``max_frames`` rows from a stream: keep the smallest random keys."""
    rows, keys = None, np.empty(0)
    for chunk in chunks:
        chunk = np.asarray(chunk)
        rows = chunk if rows is None else np.concatenate([rows, chunk])
        keys = np.concatenate([keys, rng.random(len(chunk))])
        if len(rows) > max_frames:
            keep = np.sort(np.argpartition(keys, max_frames)[:max_frames])
            rows, keys = rows[keep], keys[keep]
    if rows is None or len(rows) == 0:
        raise ValueError("client has no frames")
    return rows


def fit_federated(client_frames: Sequence[Callable[[], Iterable[np.ndarray]]], k: int, *,
                  k_local: int, max_rounds: int, tol: float, seed: int, sample_clients: float = 1.0,
                  init: np.ndarray | None = None, update: str = "lloyd",
                  init_max_frames: int = 20_000) -> tuple[np.ndarray, list[dict]]:
    """In-process reference run: k-FED init (unless ``init``), then rounds until converged/max_rounds.

    ``client_frames[i]()`` yields client i's frame chunks afresh. A client that raises is left out
    of that step with a warning; :class:`FederationError` if none succeeds. ``update`` is "lloyd" or
    "minibatch". Each history entry: round, clients, failed, inertia (of the codebook going into
    the round), clusters_used, reseeded, bytes_up ({client: bytes}, see :func:`message_bytes`)."""
    if update not in ("lloyd", "minibatch"):
        raise ValueError(f"update must be 'lloyd' or 'minibatch', got {update!r}")
    rng = np.random.default_rng(seed)

    def call(i: int, what: str, fn: Callable):
        try:
            return fn()
        except Exception as e:  # one client's failure must not end the federation
            log.warning("client %d failed during %s and is left out: %s: %s", i, what, type(e).__name__, e)

    if init is None:
        results = [call(i, "init", lambda i=i: local_centres(
            reservoir_sample(client_frames[i](), init_max_frames, np.random.default_rng([seed, i])),
            k_local, seed + i, init_max_frames)) for i in range(len(client_frames))]
        ok = [r for r in results if r is not None]
        if not ok:
            raise FederationError("no client succeeded in the k-means initialisation")
        codebook = initial_codebook([c for c, _ in ok], k, seed)
    else:
        codebook = np.asarray(init, np.float64).copy()
    running = np.zeros(k, np.int64)
    history: list[dict] = []
    prev: float | None = None
    m = max(1, int(round(sample_clients * len(client_frames))))
    for rnd in range(1, max_rounds + 1):
        sampled = sorted(rng.choice(len(client_frames), m, replace=False).tolist())
        got = {i: call(i, f"round {rnd}", lambda i=i: client_stats(codebook, client_frames[i]()))
               for i in sampled}
        ok = {i: s for i, s in got.items() if s is not None}
        if not ok:
            raise FederationError(f"round {rnd}: all {len(sampled)} sampled clients failed")
        total = sum(ok.values(), ClusterStats.zeros(*codebook.shape))
        reseeded: list[int] = []
        if update == "lloyd":
            codebook, info = lloyd_update(codebook, total, seed=seed + rnd)
            reseeded = info["reseeded"]
        else:
            codebook, running = minibatch_update(codebook, running, total)
        history.append({"round": rnd, "clients": sorted(ok), "failed": sorted(set(sampled) - set(ok)),
                        "inertia": total.inertia, "clusters_used": int((total.counts > 0).sum()),
                        "reseeded": reseeded, "bytes_up": {i: message_bytes(*codebook.shape) for i in ok}})
        if converged(prev, total.inertia, tol):
            break
        prev = total.inertia
    return codebook, history
