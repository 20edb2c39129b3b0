"""HuBERT targets: frame features (features.py: MFCC for the first iteration, a transformer layer of
the previous iteration's model for the next ones; ``kmeans.features``) clustered by k-means.

With ``kmeans.codebook: local`` each client fits its own MiniBatchKMeans on its own training split
only (client-specific ids, never comparable across clients); with ``federated`` all clients fit one
shared codebook by federated k-means (federation/kmeans_app.py). Either way every client labels
every utterance of its train and valid splits, one ``.km`` line per ``.tsv`` line with exactly
``num_frames(num_samples)`` ids.

Memory stays flat however large the corpus: utterances are decoded one at a time and their frames
go through a single preallocated chunk of ``kmeans.batch_size`` rows fed to ``partial_fit``.
``kmeans.percent`` < 1 fits on a seeded uniform sample of whole utterances holding that share of a
client's training frames (:func:`fitting_utterances`); labelling always covers every frame.

``<data.partitions_dir>/targets.json`` records what made the labels (:func:`targets_record`): the
features (with hubert: the checkpoint, its SHA-1 and the layer), the iteration, the codebook mode,
K per client; the pretraining copies it into its checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import joblib
import numpy as np
from sklearn.cluster import MiniBatchKMeans
from tqdm import tqdm

from fedhubert.audio import load_audio
from fedhubert.config import NUM_SPECIAL_SYMBOLS, Config, num_frames
from fedhubert.data import REBUILD, check_client_data, derive_seed, read_manifest
from fedhubert.errors import ConfigError, DataError
from fedhubert.features import FeatureCache, HubertFeatures, MfccFeatures, make_features
from fedhubert.fileio import atomic_open, atomic_path
from fedhubert.partition import CODEBOOK_FILE, SPLITS, TARGETS_FILE, client_dir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

def cluster_count(train_frames: int, cfg: Config, client: str) -> int:
    """min(kmeans.n_clusters, frames // kmeans.min_frames_per_cluster); at least 2. ``train_frames``
    are the frames k-means is fitted on (all training frames, or kmeans.percent of them)."""
    k = min(cfg.kmeans.n_clusters, train_frames // cfg.kmeans.min_frames_per_cluster)
    if k < 2:
        share = f" (kmeans.percent {cfg.kmeans.percent} of the training frames)" if cfg.kmeans.percent < 1 else ""
        raise DataError(f"{client}: {train_frames} training frames{share} are too few for 2 clusters at "
                        f"kmeans.min_frames_per_cluster {cfg.kmeans.min_frames_per_cluster}; give the client "
                        f"more audio (fewer partition.num_clients){', raise kmeans.percent' if share else ''} "
                        f"or lower min_frames_per_cluster")
    return k


def fitting_utterances(cfg: Config, sizes: Sequence[int], client: int | str) -> np.ndarray:
    """Indices (sorted) of the training utterances k-means is fitted on: all of them, or with
    kmeans.percent < 1 a uniform random set of whole utterances (seeded by ``seed`` and the client)
    drawn until they hold at least ceil(percent x the split's frames), as fairseq's learn_kmeans.py
    samples utterances. Whole utterances keep the features' cost to the same share."""
    n = len(sizes)
    if cfg.kmeans.percent >= 1.0 or n == 0:
        return np.arange(n)
    frames = np.array([num_frames(int(s)) for s in sizes], dtype=np.int64)
    order = np.random.default_rng(derive_seed(cfg.seed, "kmeans-percent", client)).permutation(n)
    need = math.ceil(cfg.kmeans.percent * int(frames.sum()))
    count = min(n, int(np.searchsorted(np.cumsum(frames[order]), need)) + 1)
    return np.sort(order[:count])


class SplitFrames:
    """The feature frames of one client split, one utterance at a time, with length checks."""

    def __init__(self, tsv: Path, features: MfccFeatures | HubertFeatures, sample_rate: int, progress: bool = True):
        self.tsv, self.features, self.sample_rate, self.progress = tsv, features, sample_rate, progress
        self.root, self.paths, self.sizes = read_manifest(tsv)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_frames(self) -> int:
        return sum(num_frames(n) for n in self.sizes)

    def frames_of(self, indices: Iterable[int]) -> int:
        """Frames of the utterances ``indices``."""
        return sum(num_frames(self.sizes[int(i)]) for i in indices)

    def utterance(self, i: int) -> np.ndarray:
        """Features of utterance ``i``; its length must match what the manifest promises."""
        path = self.root / self.paths[i]
        try:
            wav = load_audio(path, self.sample_rate)
        except DataError as exc:  # a header can look fine while the data is truncated or corrupt
            raise DataError(f"{exc}; listed in {self.tsv}: remove or replace the file, then rebuild "
                            f"the client folder ({REBUILD})") from None
        if wav.shape[0] != self.sizes[i]:
            raise DataError(f"{path}: decoded {wav.shape[0]} samples at {self.sample_rate} Hz but {self.tsv} "
                            f"lists {self.sizes[i]}; the file changed since the folder was made: rebuild the "
                            f"folder ({REBUILD})")
        feats = self.features(wav)
        if feats.shape[0] != num_frames(self.sizes[i]):
            raise DataError(f"{path}: {feats.shape[0]} feature frames but num_frames({self.sizes[i]}) = "
                            f"{num_frames(self.sizes[i])} (listed in {self.tsv})")
        return feats

    def stream(self, order: Sequence[int], desc: str) -> Iterator[tuple[int, np.ndarray]]:
        for i in tqdm(order, desc=desc, unit="utt", disable=not self.progress):
            yield int(i), self.utterance(int(i))


def fit_kmeans(passes: Callable[[int], Iterable[np.ndarray]], dim: int, n_clusters: int, chunk: int,
               num_passes: int, seed: int) -> MiniBatchKMeans:
    """Streams ``num_passes`` passes of feature arrays (``passes(p)`` yields pass p's utterances)
    through ``partial_fit`` in chunks of ``chunk`` frames, buffering at most one chunk.

    The first chunk also seeds k-means++, so it must hold at least ``n_clusters`` frames: the caller
    guarantees ``chunk >= n_clusters`` and at least ``n_clusters`` frames per pass."""
    km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=chunk, n_init=1, compute_labels=False,
                         random_state=seed)
    buf, fill = np.empty((chunk, dim), dtype=np.float32), 0
    for p in range(num_passes):
        for feats in passes(p):
            pos = 0
            while pos < len(feats):
                take = min(chunk - fill, len(feats) - pos)
                buf[fill:fill + take] = feats[pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == chunk:
                    km.partial_fit(buf)
                    fill = 0
        if fill:  # the pass's tail; a pass never spills into the next one
            km.partial_fit(buf[:fill])
            fill = 0
    return km


def write_labels(km: MiniBatchKMeans, frames: SplitFrames, target: Path, desc: str,
                 cache: FeatureCache | None = None) -> None:
    """One line of cluster ids per manifest line, in manifest order, into ``target`` (a temp path); the
    features from ``cache`` when given (it holds every utterance of ``frames``), else computed.

    ``km`` is anything with ``predict(frames [N, D]) -> ids [N]`` (a fitted k-means, or a codebook)."""
    order = range(len(frames))
    source = ((i, cache[i]) for i in order) if cache is not None else frames.stream(order, desc)
    with open(target, "w") as handle:
        for i, feats in source:
            labels = km.predict(feats)
            if len(labels) != num_frames(frames.sizes[i]):
                raise DataError(f"{frames.root / frames.paths[i]}: {len(labels)} labels, expected "
                                f"num_frames({frames.sizes[i]}) = {num_frames(frames.sizes[i])}")
            handle.write(" ".join(map(str, labels.tolist())) + "\n")


@contextlib.contextmanager
def label_files(km: MiniBatchKMeans, splits: dict[str, SplitFrames], folder: Path,
                caches: dict[str, FeatureCache] | None = None) -> Iterator[contextlib.ExitStack]:
    """Writes ``<split>.km`` of every split into ``folder`` (features from ``caches[split]`` where given);
    all of them (and whatever the caller adds to the yielded stack with ``atomic_path``) appear together,
    once the block succeeds, or none."""
    with contextlib.ExitStack() as stack:
        for s, frames in splits.items():
            write_labels(km, frames, stack.enter_context(atomic_path(folder / f"{s}.km")), f"{folder.name} label {s}",
                         (caches or {}).get(s))
        yield stack


def client_targets(cfg: Config, k: int, features: MfccFeatures | HubertFeatures, progress: bool = True) -> dict:
    """Fits client ``k``'s k-means (``<data.partitions_dir>/client_<k>``): :func:`folder_targets`."""
    return folder_targets(cfg, client_dir(cfg.data.partitions_dir, k), k, features, progress)


def folder_targets(cfg: Config, d: Path, k: int | str, features: MfccFeatures | HubertFeatures,
                   progress: bool = True) -> dict:
    """Fits the k-means of the client folder ``d`` on its train split (kmeans.percent of it); writes
    train.km, valid.km, kmeans.joblib there. ``k`` (the client's number, or a name) seeds the sampling
    and k-means. Reads this folder's files only, so its cost does not grow with other clients'.

    The three files appear together or not at all (renamed only after all are complete)."""
    splits = {s: SplitFrames(d / f"{s}.tsv", features, cfg.data.sample_rate, progress) for s in SPLITS}
    train = splits["train"]
    train_frames, fit = train.num_frames, fitting_utterances(cfg, train.sizes, k)
    fit_frames = train.frames_of(fit)
    n_clusters = cluster_count(fit_frames, cfg, d.name)
    if n_clusters < cfg.kmeans.n_clusters:
        log.info("%s: %d clusters (%d frames to fit // kmeans.min_frames_per_cluster %d)", d.name,
                 n_clusters, fit_frames, cfg.kmeans.min_frames_per_cluster)
    if len(fit) < len(train):
        log.info("%s: fitting on %d of %d training utterances (%d of %d frames, kmeans.percent %g)", d.name,
                 len(fit), len(train), fit_frames, train_frames, cfg.kmeans.percent)
    chunk = max(cfg.kmeans.batch_size, n_clusters)  # k-means++ needs n_clusters frames in the first chunk
    seed, passes = derive_seed(cfg.seed, "kmeans", k), cfg.kmeans.fit_passes

    def shuffled_pass(p: int) -> Iterator[np.ndarray]:
        # One utterance's frames are strongly correlated: a fresh random utterance order each pass
        # keeps consecutive chunks closer to the random mini-batches k-means expects.
        order = fit[np.random.default_rng(derive_seed(seed, p)).permutation(len(fit))]
        return (cache[int(i)] for i in order)

    with FeatureCache(d, features.dim) as cache:  # every training utterance decoded once, not passes + 1 times
        for _, feats in train.stream(range(len(train)), f"{d.name} features"):
            cache.append(feats)
        km = fit_kmeans(shuffled_pass, features.dim, n_clusters, chunk, passes, seed)
        with label_files(km, splits, d, {"train": cache}) as stack:
            joblib.dump(km, stack.enter_context(atomic_path(d / "kmeans.joblib")))
    info = {"client": k, "n_clusters": n_clusters, "train_frames": train_frames, "fit_frames": fit_frames,
            "train_utterances": len(splits["train"]), "fit_utterances": len(fit),
            "valid_utterances": len(splits["valid"])}
    log.info("%s: wrote train.km, valid.km, kmeans.joblib (%d clusters)", d.name, n_clusters)
    return info


def check_codebook(cfg: Config, vocab_size: int | None = None, why: str = "kmeans.codebook is federated") -> Path:
    """kmeans.codebook=federated, before a training stage starts: ``<data.partitions_dir>/codebook.npy``
    must exist (generate_kmeans_targets.py writes it only with kmeans.codebook=federated and deletes
    it with local), its K clusters must fit the label space (``vocab_size`` >= K + 4; default
    model.vocab_size), and no client folder here may still hold a per-client ``kmeans.joblib`` (its
    labels are not the codebook's: the federated labelling never reached it). Returns the path;
    otherwise one-line DataError naming the file (``why`` says why a codebook is needed)."""
    out = Path(cfg.data.partitions_dir)
    path, vocab_size = out / CODEBOOK_FILE, vocab_size or cfg.model.vocab_size
    if not path.is_file():
        raise DataError(f"{path} not found but {why}: the targets in {out} were made with per-client k-means; "
                        "run generate_kmeans_targets.py with kmeans.codebook=federated first (or use kmeans.codebook=local)")
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        raise DataError(f"{path} is not a readable codebook ({exc}): rerun generate_kmeans_targets.py") from None
    if len(shape) != 2 or shape[0] < 2:
        raise DataError(f"{path}: shape {tuple(shape)} is not a [K, D] codebook: rerun generate_kmeans_targets.py")
    if vocab_size < shape[0] + NUM_SPECIAL_SYMBOLS:
        raise DataError(f"{path} has {shape[0]} clusters but model.vocab_size is {vocab_size} (needs at least "
                        f"{shape[0] + NUM_SPECIAL_SYMBOLS} = K + 4): raise model.vocab_size or remake the codebook "
                        f"with kmeans.n_clusters <= {vocab_size - NUM_SPECIAL_SYMBOLS}")
    for k in range(cfg.partition.num_clients):
        stale = client_dir(out, k) / "kmeans.joblib"
        if stale.exists():
            raise DataError(f"{stale}: client {k}'s labels come from its own k-means, not from {path}: rerun "
                            "generate_kmeans_targets.py with kmeans.codebook=federated")
    return path


def targets_record(cfg: Config, features: MfccFeatures | HubertFeatures) -> dict[str, Any]:
    """What makes the clients' labels, as targets.json records it (without the per-client ``clusters``
    and the ``codebook_sha1`` that only the finished run knows): the iteration (1 for MFCC; with hubert
    1 + the iteration of the targets the checkpoint was trained on), the features (hubert: checkpoint,
    its SHA-1, layer), the codebook mode and the k-means keys."""
    k = cfg.kmeans
    return {**features.record(), "codebook": k.codebook, "n_clusters": k.n_clusters,
            "min_frames_per_cluster": k.min_frames_per_cluster, "percent": k.percent, "seed": cfg.seed}


def read_targets(partitions_dir: str | Path) -> dict[str, Any] | None:
    """``<partitions_dir>/targets.json`` as a dict; None when absent (targets made before it existed)."""
    path = Path(partitions_dir) / TARGETS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise DataError(f"{path} is not a JSON object: rerun generate_kmeans_targets.py")
    return record


def write_targets(partitions_dir: str | Path, record: dict[str, Any], clusters: dict[int, int],
                  codebook_sha1: str | None = None, merge: bool = False) -> dict[str, Any]:
    """Writes targets.json: ``record`` (:func:`targets_record`), ``clusters`` {client: K} (with ``merge``
    added to the clients an earlier run of the same record labelled) and, for a federated codebook,
    its SHA-1. Returns what was written."""
    old = read_targets(partitions_dir) if merge else None
    before = old.get("clusters", {}) if old else {}
    out = {**record, "clusters": {**before, **{str(c): int(n) for c, n in clusters.items()}}}
    out["clusters"] = dict(sorted(out["clusters"].items(), key=lambda item: int(item[0])))
    if codebook_sha1 is not None:
        out["codebook_sha1"] = codebook_sha1
    with atomic_open(Path(partitions_dir) / TARGETS_FILE) as handle:
        json.dump(out, handle, indent=2)
        handle.write("\n")
    return out


def targets_differ(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """``key: a -> b`` of every targets.json entry (but ``skip``) that differs."""
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if key not in skip and a.get(key) != b.get(key)]


def parse_clients(text: str | None, num_clients: int) -> list[int]:
    """``--clients 0,2`` -> [0, 2]; None -> every client."""
    if text is None:
        return list(range(num_clients))
    try:
        ids = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--clients {text!r}: expected comma-separated client numbers, e.g. 0,2") from None
    bad = [i for i in ids if not 0 <= i < num_clients]
    if not ids or bad:
        raise ConfigError(f"--clients {text!r}: client numbers must be in 0..{num_clients - 1} "
                          f"(partition.num_clients {num_clients})")
    return ids


def generate_targets(cfg: Config, clients: str | None = None) -> list[dict]:
    """generate_kmeans_targets.py: k-means targets for every (or the chosen) client; with
    ``kmeans.codebook: federated`` one codebook for all clients, by a Flower simulation."""
    out = Path(cfg.data.partitions_dir)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"{summary_path} not found: run partition_data.py with the same config first")
    try:
        made = json.loads(summary_path.read_text())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        made = None
    if not isinstance(made, dict):
        raise DataError(f"{summary_path} is not a JSON object: rerun partition_data.py")
    for key, field, have in (("partition.num_clients", "num_clients", cfg.partition.num_clients),
                             ("data.sample_rate", "sample_rate", cfg.data.sample_rate)):
        was = made.get(field)
        if was != have:
            raise ConfigError(f"{key} is {have} but the partitions in {out} were made with {was}; "
                              f"pass the same --set overrides as to partition_data.py")
    federated = cfg.kmeans.codebook == "federated"
    if federated and clients is not None:
        raise ConfigError(f"--clients {clients}: kmeans.codebook=federated fits one codebook with every client; "
                          f"drop --clients (or use kmeans.codebook=local)")
    ids = parse_clients(clients, cfg.partition.num_clients)
    features = make_features(cfg)  # kmeans.checkpoint and kmeans.layer are checked here, before any fitting
    for k in ids:  # fail before anything is fitted or removed if a manifest or an audio file it lists is bad
        check_client_data(client_dir(out, k), None, SPLITS)  # no labels yet: this stage makes them
    record = targets_record(cfg, features)
    if features.iteration > 1:
        log.info("iteration %d targets: layer %d of %d of %s (SHA-1 %s)", features.iteration, features.layer,
                 features.num_layers, features.path, features.sha1[:12])
    if federated:
        from fedhubert.federation.simulation import run_federated_kmeans  # imports Flower: only when needed

        return run_federated_kmeans(cfg)["clients"]  # its server writes targets.json
    old = read_targets(out) if clients is not None else None
    if old is not None and targets_differ(old, record, skip=("clusters", "codebook_sha1")):
        raise ConfigError(f"--clients {clients}: the other clients' labels in {out} were made otherwise "
                          f"({'; '.join(targets_differ(old, record, skip=('clusters', 'codebook_sha1')))}, "
                          f"{TARGETS_FILE}): drop --clients to relabel every client the same way")
    if (out / CODEBOOK_FILE).exists():
        log.warning("removing %s: with kmeans.codebook=local the clients' ids no longer share it", out / CODEBOOK_FILE)
        (out / CODEBOOK_FILE).unlink()
    if clients is None:  # every client is relabelled: the old record must not outlive a failed run
        (out / TARGETS_FILE).unlink(missing_ok=True)
    from fedhubert.target_pool import all_client_targets  # it imports this module

    infos = all_client_targets(cfg, ids, features)
    write_targets(out, record, {i["client"]: i["n_clusters"] for i in infos}, merge=clients is not None)
    return infos
