"""A client's training data: fairseq manifests (``<split>.tsv``) and frame labels (``<split>.km``)
turned into padded batches whose labels stay aligned with the model's 20 ms frames.

Alignment rule: a crop starts at a multiple of FRAME_STRIDE (320 samples), so the crop's frame j is
the utterance's frame ``offset // 320 + j`` and its labels are a plain slice of the utterance's labels.

Reproducibility: every random choice (crop offsets, shuffling) comes from ``derive_seed(seed, epoch,
index)`` - never from a global RNG - so a resumed run that rebuilds its loader with the same seed
sees the same crops in the same order.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fedhubert.audio import load_crop
from fedhubert.config import FRAME_LENGTH, FRAME_STRIDE, NUM_SPECIAL_SYMBOLS, Config, num_frames
from fedhubert.errors import DataError, FedHubertError

log = logging.getLogger(__name__)
# how a client folder is made again: the simulation's stage, or a deployed client's own command
REBUILD = "partition_data.py; on a client machine, prepare_client.py"

IGNORE_INDEX = -100  # target id of frames that carry no label (padding); ignored by the loss


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from several ints/strings, e.g. ``derive_seed(cfg.seed, round, client_id)``.

    Distinct part tuples give independent streams (numpy's SeedSequence hashing), unlike ``a + b``."""
    words = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    if any(w < 0 for w in words):
        raise ValueError(f"derive_seed needs non-negative ints, got {parts!r}")
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------------
# Reading a split
# ---------------------------------------------------------------------------------------------------

MAX_NUM_SAMPLES = 2**31 - 1  # 37 h at 16 kHz: a longer "utterance" is a corrupt manifest, not speech


def read_text(path: Path, what: str) -> str:
    """``path`` as UTF-8 text; a missing, unreadable or non-UTF-8 file is a DataError naming the file (and
    the line of the first bad byte)."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None


def numbered_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line of ``path`` (:func:`read_text`), numbered as an editor
    does (by ``\\n``)."""
    lines = read_text(path, what).split("\n")
    return [(n, line.rstrip("\r")) for n, line in enumerate(lines, start=1) if line.strip()]


def manifest_entries(tsv: Path) -> tuple[Path, list[tuple[int, str, int]]]:
    """(audio root, [(line number, relative path, num_samples)]) of a fairseq ``.tsv`` manifest; every
    malformed line is a DataError naming the file and line. A relative root (prepare_client.py writes one,
    so a client folder can move with its audio) is relative to the manifest's folder: it comes back
    resolved to an absolute path, so every reader gets a root that works from any working folder."""
    lines = numbered_lines(tsv, "manifest")
    if not lines or lines[0][0] != 1:
        raise DataError(f"{tsv}:1: line 1 must hold the audio root directory")
    root, entries = Path(lines[0][1].strip()), []
    if not root.is_absolute():
        root = (tsv.parent / root).resolve()
    for lineno, line in lines[1:]:
        fields = line.split("\t")
        size_text = fields[-1].strip()
        if len(fields) != 2 or not fields[0] or not (size_text.isascii() and size_text.isdigit()):
            raise DataError(f"{tsv}:{lineno}: expected 'relative/path<TAB>num_samples', got {line!r}")
        size = int(size_text)
        if size < FRAME_LENGTH:
            raise DataError(f"{tsv}:{lineno}: {size} samples is shorter than one frame ({FRAME_LENGTH})")
        if size > MAX_NUM_SAMPLES:
            raise DataError(f"{tsv}:{lineno}: {size} samples is more than {MAX_NUM_SAMPLES}; rebuild the manifest")
        entries.append((lineno, fields[0], size))
    return root, entries


def read_manifest(tsv: Path) -> tuple[Path, list[str], list[int]]:
    """(audio root, relative paths, num_samples) of a fairseq ``.tsv`` manifest."""
    root, entries = manifest_entries(tsv)
    return root, [path for _, path, _ in entries], [size for _, _, size in entries]


def read_labels(km: Path, sizes: list[int], num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of a ``.km`` file as one flat int16 array plus per-utterance start offsets.

    Checks one line per manifest entry, ``num_frames(num_samples)`` ids per line and ids in
    ``[0, num_clusters)``; every failure names the file and line."""
    lines = numbered_lines(km, "label file")
    if len(lines) != len(sizes):
        where = lines[len(sizes)][0] if len(lines) > len(sizes) else (lines[-1][0] + 1 if lines else 1)
        raise DataError(f"{km}:{where}: {len(lines)} label lines but the manifest lists {len(sizes)} utterances")
    counts = np.array([num_frames(n) for n in sizes], dtype=np.int64)
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    parts = []  # checked line by line before anything the size of the manifest's promise is allocated
    for (lineno, line), count, size in zip(lines, counts, sizes):
        try:
            ids = np.array(line.split(), dtype=np.int64)
        except (ValueError, OverflowError):
            raise DataError(f"{km}:{lineno}: labels must be integers") from None
        if len(ids) != count:
            raise DataError(f"{km}:{lineno}: {len(ids)} labels, expected num_frames({size}) = {count}")
        if len(ids) and (ids.min() < 0 or ids.max() >= num_clusters):
            raise DataError(f"{km}:{lineno}: cluster id out of range [0, {num_clusters}) "
                            f"(model.vocab_size {num_clusters + NUM_SPECIAL_SYMBOLS})")
        parts.append(ids.astype(np.int16 if num_clusters <= 2**15 else np.int32))
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int16)
    return flat, starts


def check_client_data(folder: Path, num_clusters: int | None, splits: tuple[str, ...] = ("train", "valid")) -> None:
    """What a client will read, checked before a stage writes or starts anything: every ``<split>.tsv``,
    that every audio file it lists exists, and (unless ``num_clusters`` is None: no labels yet) its
    ``<split>.km`` with ids in ``[0, num_clusters)``. One DataError naming the file and line at the first
    problem."""
    for split in splits:
        tsv = folder / f"{split}.tsv"
        root, entries = manifest_entries(tsv)
        if num_clusters is not None:
            read_labels(folder / f"{split}.km", [size for _, _, size in entries], num_clusters)
        for lineno, rel, _ in entries:
            if not (root / rel).is_file():
                raise DataError(f"{tsv}:{lineno}: audio file {root / rel} not found; restore the file, or rebuild "
                                f"the client folder ({REBUILD})")


def majority_share(labels: np.ndarray) -> float:
    """Share of the most frequent cluster among ``labels``: the accuracy of a majority guess, the
    chance level of masked prediction on those labels."""
    return float(np.bincount(labels.astype(np.int64)).max() / len(labels)) if len(labels) else 0.0


# ---------------------------------------------------------------------------------------------------
# Dataset, sampler and collate
# ---------------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One crop: its audio, its cluster ids (one per frame) and where it came from."""
    waveform: torch.Tensor  # [L] float32
    labels: torch.Tensor    # [num_frames(L)] long cluster ids
    index: int
    offset: int             # first sample of the crop inside the utterance (a multiple of 320)


class ClientDataset(Dataset):
    """The crops of one client split. Index with ``i`` (epoch 0) or ``(i, epoch)`` (what the sampler
    yields): training crops are random but a pure function of (seed, epoch, i)."""

    def __init__(self, client_dir: str | Path, split: str, cfg: Config, train: bool, *, seed: int = 0):
        self.client_dir = Path(client_dir)
        self.tsv, self.km = self.client_dir / f"{split}.tsv", self.client_dir / f"{split}.km"
        self.root, self.paths, self.sizes = read_manifest(self.tsv)
        num_clusters = cfg.model.vocab_size - NUM_SPECIAL_SYMBOLS
        self.labels, self.label_starts = read_labels(self.km, self.sizes, num_clusters)
        self.sample_rate = cfg.data.sample_rate
        self.crop = cfg.data.max_audio_length
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        return len(self.sizes)

    def crop_offset(self, index: int, epoch: int = 0) -> int:
        """First sample of the crop: 0 for validation or short utterances, else a random multiple
        of 320 drawn from (seed, epoch, index)."""
        spare_strides = (self.sizes[index] - self.crop) // FRAME_STRIDE
        if not self.train or spare_strides <= 0:
            return 0
        rng = np.random.default_rng(derive_seed(self.seed, epoch, index))
        return int(rng.integers(0, spare_strides + 1)) * FRAME_STRIDE

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        size = self.sizes[index]
        path = self.root / self.paths[index]
        offset = self.crop_offset(index, epoch)
        length = min(size, self.crop)
        # only the crop's frames are decoded (a 16 kHz file): a LibriSpeech utterance averages ~12 s
        wav, total = load_crop(path, self.sample_rate, offset, length)
        if total != size:
            raise DataError(f"{path}: holds {total} samples at {self.sample_rate} Hz but "
                            f"{self.tsv} lists {size}; the .tsv/.km files are stale, rebuild them")
        if wav.shape[-1] != length:
            raise DataError(f"{path}: decoded {wav.shape[-1]} of the {length} samples from sample {offset} "
                            f"that its header promises; the file is truncated or corrupt")
        first = self.label_starts[index] + offset // FRAME_STRIDE
        labels = self.labels[first:first + num_frames(length)]
        return Item(wav, torch.from_numpy(labels.astype(np.int64)), index, offset)


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` keys; each pass over it is the next epoch (or ``set_epoch``).

    Passing the epoch with the index (not via a dataset attribute) keeps crops right even when
    DataLoader workers hold their own copy of the dataset."""

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "shuffle"))
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        return iter([(i, epoch) for i in order])


@dataclass
class Batch:
    """A padded batch, ready for ``model.pretraining_step``."""
    waveforms: torch.Tensor     # [B, Lmax] float32, zero-padded
    padding_mask: torch.Tensor  # [B, Lmax] bool, True = padding
    target_ids: torch.Tensor    # [B, num_frames(Lmax)] long: cluster id + 4, IGNORE_INDEX past an utterance
    num_samples: list[int]      # real (unpadded) length of each crop
    indices: list[int]          # dataset index of each crop
    offsets: list[int]          # crop start inside its utterance

    def __len__(self) -> int:
        return len(self.num_samples)

    def to(self, device: torch.device | str) -> "Batch":
        non_blocking = torch.device(device).type == "cuda"
        return Batch(self.waveforms.to(device, non_blocking=non_blocking),
                     self.padding_mask.to(device, non_blocking=non_blocking),
                     self.target_ids.to(device, non_blocking=non_blocking),
                     self.num_samples, self.indices, self.offsets)


def collate(items: list[Item]) -> Batch:
    """Zero-pads crops to the longest; frames past a crop's own frames get IGNORE_INDEX.

    Built in numpy: torch fills and copies of over 32k elements wake every intra-op thread, which made
    the loader 3-4x slower in a training process sharing busy cores (benchmarks/bench_loader.py)."""
    lengths = [it.waveform.shape[0] for it in items]
    longest = max(lengths)
    waveforms = np.zeros((len(items), longest), dtype=np.float32)
    padding_mask = np.ones((len(items), longest), dtype=bool)
    target_ids = np.full((len(items), num_frames(longest)), IGNORE_INDEX, dtype=np.int64)
    for b, (it, n) in enumerate(zip(items, lengths)):
        waveforms[b, :n] = it.waveform.numpy()
        padding_mask[b, :n] = False
        target_ids[b, :len(it.labels)] = it.labels.numpy() + NUM_SPECIAL_SYMBOLS
    return Batch(torch.from_numpy(waveforms), torch.from_numpy(padding_mask), torch.from_numpy(target_ids), lengths,
                 [it.index for it in items], [it.offset for it in items])


def synthetic_batch(cfg: Config, batch_size: int, seed: int = 0) -> Batch:
    """Full-length random crops with random targets: the largest batch training can see (used to
    probe memory for batch_size=auto)."""
    gen = torch.Generator().manual_seed(seed)
    length, clusters = cfg.data.max_audio_length, cfg.model.vocab_size - NUM_SPECIAL_SYMBOLS
    return collate([Item(0.1 * torch.randn(length, generator=gen),
                         torch.randint(0, clusters, (num_frames(length),), generator=gen), i, 0)
                    for i in range(batch_size)])


class ClientLoader(DataLoader):
    """A DataLoader whose worker processes' errors reach the caller as the one line they were raised with:
    torch re-raises a worker's exception with the worker's whole traceback as its message."""

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from super().__iter__()
        except FedHubertError as exc:
            text = str(exc)
            if not text.startswith("Caught "):
                raise
            raise type(exc)(text.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]) from None


def make_loader(client_dir: str | Path, split: str, cfg: Config, *, batch_size: int, seed: int,
                train: bool, num_workers: int | None = None) -> DataLoader:
    """Batches of one client split. ``train`` shuffles and crops at random (from ``seed``); otherwise
    the order is fixed and crops start at 0. The last, smaller batch is kept.

    ``num_workers`` (default training.loader_workers) processes read and crop the audio while the model
    trains; the batches are the same as with none, since every crop is a pure function of (seed, epoch,
    index), and torch gives each one thread. Every epoch's iterator draws its one base seed from the
    global torch RNG, with workers or without, so the masks and dropout that follow (and so the
    training) are the same for any worker count, and the same as before workers existed. For that the
    workers are not persistent: with persistent workers torch skips the draw after the first epoch."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1 for {client_dir}/{split}, got {batch_size}")
    workers = cfg.training.loader_workers if num_workers is None else num_workers
    dataset = ClientDataset(client_dir, split, cfg, train, seed=seed)
    sampler = EpochSampler(len(dataset), seed, shuffle=train)
    log.debug("%s/%s: %d utterances, batch size %d, %d loader workers", client_dir, split, len(dataset),
              batch_size, workers)
    return ClientLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=workers, drop_last=False, pin_memory=False)
