"""First-iteration HuBERT targets: MFCC (+ deltas) frames clustered by k-means.

With ``kmeans.codebook: local`` each client fits its own MiniBatchKMeans on its own training split
only (client-specific ids, never comparable across clients); with ``federated`` all clients fit one
shared codebook by federated k-means (federation/kmeans_app.py). Either way every client labels
every utterance of its train and valid splits, one ``.km`` line per ``.tsv`` line with exactly
``num_frames(num_samples)`` ids.

Memory stays flat however large the corpus: utterances are decoded one at a time and their frames
go through a single preallocated chunk of ``kmeans.batch_size`` rows fed to ``partial_fit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import joblib
import numpy as np
import torch
import torchaudio
from sklearn.cluster import MiniBatchKMeans
from tqdm import tqdm

from fedhubert.audio import load_audio
from fedhubert.config import FRAME_LENGTH, FRAME_STRIDE, NUM_SPECIAL_SYMBOLS, Config, num_frames
from fedhubert.data import derive_seed, read_manifest
from fedhubert.errors import ConfigError, DataError
from fedhubert.fileio import atomic_path
from fedhubert.partition import SPLITS, client_dir

log = logging.getLogger(__name__)
CODEBOOK_FILE = "codebook.npy"  # kmeans.codebook=federated: the clients' shared codebook, under data.partitions_dir


class MfccFeatures:
    """Waveform ``[L]`` -> float32 features ``[num_frames(L), n_mfcc * (3 if deltas else 1)]``."""

    def __init__(self, cfg: Config):
        k = cfg.kmeans
        if k.n_mfcc > k.n_mels:
            raise ConfigError(f"kmeans.n_mfcc ({k.n_mfcc}) must not exceed kmeans.n_mels ({k.n_mels})")
        # Window and hop equal the model's CNN receptive field and stride, and center=False adds no
        # padding, so MFCC frame i covers exactly the samples of model frame i.
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=cfg.data.sample_rate, n_mfcc=k.n_mfcc,
            melkwargs={"n_fft": FRAME_LENGTH, "n_mels": k.n_mels, "hop_length": FRAME_STRIDE,
                       "win_length": FRAME_LENGTH, "center": False})
        self.use_deltas = k.use_deltas
        self.dim = k.n_mfcc * (3 if k.use_deltas else 1)

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor) -> np.ndarray:
        feats = self.mfcc(wav)  # [n_mfcc, T]
        if self.use_deltas:
            delta = torchaudio.functional.compute_deltas(feats)
            feats = torch.cat([feats, delta, torchaudio.functional.compute_deltas(delta)])
        return feats.T.contiguous().numpy()


def cluster_count(train_frames: int, cfg: Config, client: str) -> int:
    """min(kmeans.n_clusters, train_frames // kmeans.min_frames_per_cluster); at least 2."""
    k = min(cfg.kmeans.n_clusters, train_frames // cfg.kmeans.min_frames_per_cluster)
    if k < 2:
        raise DataError(f"{client}: {train_frames} training frames are too few for 2 clusters at "
                        f"kmeans.min_frames_per_cluster {cfg.kmeans.min_frames_per_cluster}; give the client "
                        f"more audio (fewer partition.num_clients) or lower min_frames_per_cluster")
    return k


class SplitFrames:
    """The MFCC frames of one client split, one utterance at a time, with length checks."""

    def __init__(self, tsv: Path, features: MfccFeatures, sample_rate: int):
        self.tsv, self.features, self.sample_rate = tsv, features, sample_rate
        self.root, self.paths, self.sizes = read_manifest(tsv)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_frames(self) -> int:
        return sum(num_frames(n) for n in self.sizes)

    def utterance(self, i: int) -> np.ndarray:
        """Features of utterance ``i``; its length must match what the manifest promises."""
        path = self.root / self.paths[i]
        try:
            wav = load_audio(path, self.sample_rate)
        except DataError as exc:  # a header can look fine while the data is truncated or corrupt
            raise DataError(f"{exc}; listed in {self.tsv}: remove or replace the file, then rerun "
                            f"partition_data.py") from None
        if wav.shape[0] != self.sizes[i]:
            raise DataError(f"{path}: decoded {wav.shape[0]} samples at {self.sample_rate} Hz but {self.tsv} "
                            f"lists {self.sizes[i]}; the file changed since partition_data.py ran: rerun it")
        feats = self.features(wav)
        if feats.shape[0] != num_frames(self.sizes[i]):
            raise DataError(f"{path}: {feats.shape[0]} MFCC frames but num_frames({self.sizes[i]}) = "
                            f"{num_frames(self.sizes[i])} (listed in {self.tsv})")
        return feats

    def stream(self, order: Sequence[int], desc: str) -> Iterator[tuple[int, np.ndarray]]:
        for i in tqdm(order, desc=desc, unit="utt"):
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


def write_labels(km: MiniBatchKMeans, frames: SplitFrames, target: Path, desc: str) -> None:
    """One line of cluster ids per manifest line, in manifest order, into ``target`` (a temp path).

    ``km`` is anything with ``predict(frames [N, D]) -> ids [N]`` (a fitted k-means, or a codebook)."""
    with open(target, "w") as handle:
        for i, feats in frames.stream(range(len(frames)), desc):
            labels = km.predict(feats)
            if len(labels) != num_frames(frames.sizes[i]):
                raise DataError(f"{frames.root / frames.paths[i]}: {len(labels)} labels, expected "
                                f"num_frames({frames.sizes[i]}) = {num_frames(frames.sizes[i])}")
            handle.write(" ".join(map(str, labels.tolist())) + "\n")


@contextlib.contextmanager
def label_files(km: MiniBatchKMeans, splits: dict[str, SplitFrames], folder: Path) -> Iterator[contextlib.ExitStack]:
    """Writes ``<split>.km`` of every split into ``folder``; all of them (and whatever the caller adds
    to the yielded stack with ``atomic_path``) appear together, once the block succeeds, or none."""
    with contextlib.ExitStack() as stack:
        for s, frames in splits.items():
            write_labels(km, frames, stack.enter_context(atomic_path(folder / f"{s}.km")), f"{folder.name} label {s}")
        yield stack


def client_targets(cfg: Config, k: int, features: MfccFeatures) -> dict:
    """Fits client ``k``'s k-means on its train split; writes train.km, valid.km, kmeans.joblib.

    The three files appear together or not at all (renamed only after all are complete)."""
    d = client_dir(cfg.data.partitions_dir, k)
    splits = {s: SplitFrames(d / f"{s}.tsv", features, cfg.data.sample_rate) for s in SPLITS}
    train_frames = splits["train"].num_frames
    n_clusters = cluster_count(train_frames, cfg, d.name)
    if n_clusters < cfg.kmeans.n_clusters:
        log.info("%s: %d clusters (%d training frames // kmeans.min_frames_per_cluster %d)", d.name,
                 n_clusters, train_frames, cfg.kmeans.min_frames_per_cluster)
    chunk = max(cfg.kmeans.batch_size, n_clusters)  # k-means++ needs n_clusters frames in the first chunk
    seed, train, passes = derive_seed(cfg.seed, "kmeans", k), splits["train"], cfg.kmeans.fit_passes

    def shuffled_pass(p: int) -> Iterator[np.ndarray]:
        # One utterance's frames are strongly correlated: a fresh random utterance order each pass
        # keeps consecutive chunks closer to the random mini-batches k-means expects.
        order = np.random.default_rng(derive_seed(seed, p)).permutation(len(train))
        return (feats for _, feats in train.stream(order, f"{d.name} fit {p + 1}/{passes}"))

    km = fit_kmeans(shuffled_pass, features.dim, n_clusters, chunk, passes, seed)
    with label_files(km, splits, d) as stack:
        joblib.dump(km, stack.enter_context(atomic_path(d / "kmeans.joblib")))
    info = {"client": k, "n_clusters": n_clusters, "train_frames": train_frames,
            "train_utterances": len(splits["train"]), "valid_utterances": len(splits["valid"])}
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
    except (OSError, ValueError) as exc:
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
    except ValueError:
        raise DataError(f"{summary_path} is not valid JSON: rerun partition_data.py") from None
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
    features = MfccFeatures(cfg)
    for k in ids:  # fail before any fitting if a manifest is missing
        for s in SPLITS:
            read_manifest(client_dir(out, k) / f"{s}.tsv")
    if federated:
        from fedhubert.federation.simulation import run_federated_kmeans  # imports Flower: only when needed

        return run_federated_kmeans(cfg)["clients"]
    if (out / CODEBOOK_FILE).exists():
        log.warning("removing %s: with kmeans.codebook=local the clients' ids no longer share it", out / CODEBOOK_FILE)
        (out / CODEBOOK_FILE).unlink()
    with single_torch_thread():
        return [client_targets(cfg, k, features) for k in ids]


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Runs torch ops on one thread: per-utterance MFCC tensors are small, so intra-op threads only
    add synchronisation, and on shared cores they stall (40x slower measured on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
