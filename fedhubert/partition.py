"""Split a LibriSpeech manifest into federated clients and write each client's fairseq manifests.

Methods (``partition.method``):
  speaker_based  every speaker on exactly one client; speakers go, longest first, to the client with
                 the fewest hours so far (longest-processing-time greedy), so clients carry similar hours.
  iid            utterances shuffled and dealt into equal-count shares (speakers spread over clients).
  dirichlet      per speaker, client shares drawn from Dirichlet(alpha): small alpha puts each
                 speaker on few clients (label skew) and makes client sizes uneven (size skew).
Each client then holds out ``valid_fraction`` of its own utterances (at least one when it has two or
more), spread over its speakers, as its validation split.

Before any of this, ``heldout_per_speaker`` utterances of every speaker (never all of a speaker's) are
set aside in ``heldout.tsv``/``heldout.csv``: no client trains or validates on them, so the evaluation's
speaker probes can test every model on speech it never saw, from speakers it did see.

Everything is computed and checked before the first file is written; each file is written atomically.
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fedhubert.config import Config
from fedhubert.data import derive_seed
from fedhubert.errors import ConfigError
from fedhubert.fileio import atomic_open, atomic_path, atomic_write_text
from fedhubert.librispeech import CSV_COLUMNS, REJECT_COLUMNS, Utterance, scan_corpus

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
TARGET_FILES = ("train.km", "valid.km", "kmeans.joblib")  # made by generate_kmeans_targets.py
# ... and under partitions_dir: what made the labels, kmeans.codebook=federated's codebook and its rounds
TARGETS_FILE, CODEBOOK_FILE, KMEANS_METRICS_FILE = "targets.json", "codebook.npy", "kmeans_metrics.jsonl"
SHARED_TARGET_FILES = (TARGETS_FILE, CODEBOOK_FILE, KMEANS_METRICS_FILE)
_DIRICHLET_TRIES = 100


def client_dir(partitions_dir: str | Path, k: int) -> Path:
    return Path(partitions_dir) / f"client_{k}"


# ---------------------------------------------------------------------------------------------------
# Assigning utterances to clients (pure functions of rows, num_clients and seed)
# ---------------------------------------------------------------------------------------------------

def _by_speaker(rows: Sequence[Utterance]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r.speaker].append(i)
    return dict(sorted(groups.items()))


def speaker_based(rows: Sequence[Utterance], num_clients: int) -> list[list[int]]:
    """Longest-processing-time greedy over speakers: each speaker's utterances on one client."""
    groups = _by_speaker(rows)
    if num_clients > len(groups):
        raise ConfigError(f"partition.num_clients ({num_clients}) exceeds the number of speakers "
                          f"({len(groups)}) for partition.method speaker_based")
    hours = {s: sum(rows[i].duration for i in idx) / 3600 for s, idx in groups.items()}
    # (hours so far, client): the top is the least loaded client, ties broken by id (deterministic); a
    # heap, not a scan of every client per speaker, which is 5.5 M steps for 2,338 speakers and clients
    heap, clients = [(0.0, c) for c in range(num_clients)], [[] for _ in range(num_clients)]
    for spk in sorted(groups, key=lambda s: (-hours[s], s)):
        load, k = heapq.heappop(heap)
        clients[k].extend(groups[spk])
        heapq.heappush(heap, (load + hours[spk], k))
    return clients


def iid(rows: Sequence[Utterance], num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """A seeded shuffle of all utterances cut into ``num_clients`` near-equal shares."""
    order = rng.permutation(len(rows))
    return [part.tolist() for part in np.array_split(order, num_clients)]


def dirichlet(rows: Sequence[Utterance], num_clients: int, alpha: float,
              rng: np.random.Generator) -> list[list[int]]:
    """Per speaker, shares over clients ~ Dirichlet(alpha); redrawn until no client is empty."""
    groups = _by_speaker(rows)
    for _ in range(_DIRICHLET_TRIES):
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in groups.values():
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(rng.permutation(idx), cuts)):
                clients[k].extend(part.tolist())
        if all(clients):
            return clients
    raise ConfigError(f"partition.method dirichlet left a client empty in {_DIRICHLET_TRIES} draws with "
                      f"partition.dirichlet_alpha {alpha} and partition.num_clients {num_clients}; "
                      f"raise dirichlet_alpha or lower num_clients")


def assign_clients(rows: Sequence[Utterance], cfg: Config) -> list[list[int]]:
    """Row indices of each client (each list sorted), by ``cfg.partition.method``."""
    p, rng = cfg.partition, np.random.default_rng(cfg.seed)
    if p.method != "speaker_based" and p.num_clients > len(rows):
        raise ConfigError(f"partition.num_clients ({p.num_clients}) exceeds the {len(rows)} usable utterances")
    if p.method == "speaker_based":
        clients = speaker_based(rows, p.num_clients)
    elif p.method == "iid":
        clients = iid(rows, p.num_clients, rng)
    else:
        clients = dirichlet(rows, p.num_clients, p.dirichlet_alpha, rng)
    for k, idx in enumerate(clients):
        if not idx:
            raise ConfigError(f"client {k} got no utterances with partition.method {p.method}; "
                              f"lower partition.num_clients ({p.num_clients})")
    return [sorted(idx) for idx in clients]


def split_heldout(rows: Sequence[Utterance], per_speaker: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(kept, held out) row indices: ``per_speaker`` random utterances of each speaker held out,
    leaving at least one per speaker for the clients."""
    held: list[int] = []
    for speaker, idx in sorted(_by_speaker(rows).items()):
        take = min(per_speaker, len(idx) - 1)
        if take > 0:
            held += [int(i) for i in rng.choice(idx, size=take, replace=False)]
    held_set = set(held)
    return [i for i in range(len(rows)) if i not in held_set], sorted(held)


def split_valid(rows: Sequence[Utterance], idx: Sequence[int], fraction: float,
                rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(train, valid) row indices of one client. Valid takes round(fraction * n) utterances, at least
    one when n >= 2 and never all of them, dealt round-robin over the client's speakers so that
    every speaker is represented before any gives a second one."""
    n = len(idx)
    n_valid = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
    per_speaker: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        per_speaker[rows[i].speaker].append(i)
    queues = [list(rng.permutation(per_speaker[s])) for s in rng.permutation(sorted(per_speaker))]
    dealt: list[int] = []
    while len(dealt) < n_valid:
        for q in queues:
            if q and len(dealt) < n_valid:
                dealt.append(int(q.pop()))
    valid = set(dealt)
    return sorted(i for i in idx if i not in valid), sorted(valid)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def tsv_text(root: Path | str, rows: Iterable[Utterance]) -> str:
    """A fairseq manifest: the audio root as given (absolute here; prepare_client.py writes it relative to the
    manifest's folder: data.manifest_entries resolves it), then ``relative/path<TAB>num_samples`` lines."""
    return "".join([f"{root}\n"] + [f"{r.path}\t{r.num_samples}\n" for r in rows])


def write_csv(path: Path, columns: list[str], rows: Iterable[object]) -> None:
    with atomic_open(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([getattr(r, c) for c in columns])


def _hours(rows: Iterable[Utterance]) -> float:
    return round(sum(r.duration for r in rows) / 3600, 4)


def client_summary(k: int | str, splits: dict[str, list[Utterance]]) -> dict:
    """Hours, utterances, speakers and sex balance of one client."""
    every = splits["train"] + splits["valid"]
    speakers = {r.speaker: r.sex for r in every}
    sexes = sorted(set(speakers.values()))
    return {
        "client": k,
        "hours": _hours(every),
        "utterances": len(every),
        "speakers": len(speakers),
        **{split: {"hours": _hours(rs), "utterances": len(rs)} for split, rs in splits.items()},
        "speakers_by_sex": {s: sum(v == s for v in speakers.values()) for s in sexes},
        "hours_by_sex": {s: _hours(r for r in every if r.sex == s) for s in sexes},
    }


def plot_summary(path: Path, clients: list[dict], title: str) -> None:
    """Bar plot of hours per client (stacked by sex) and speakers per client, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [c["client"] for c in clients]
    sexes = sorted({s for c in clients for s in c["hours_by_sex"]})
    # a bar per client, at most 16 inches wide: 2,338 clients would otherwise make a 281,000-pixel image
    fig, (ax_h, ax_s) = plt.subplots(1, 2, figsize=(min(16.0, max(6.0, 1.2 * len(ks) + 4)), 3.5))
    ticks = {"xticks": ks} if len(ks) <= 32 else {}  # beyond that, matplotlib's own ticks

    def bars(ax, vals: np.ndarray, bottom: np.ndarray, **style) -> None:  # noqa: ANN001 - a matplotlib Axes
        if len(ks) <= 64:
            ax.bar(ks, vals, bottom=bottom, **style)
        else:  # a patch per bar takes a minute for 2,338 clients: one stepped area instead
            ax.fill_between(ks, bottom, bottom + vals, step="mid", **style)

    bottom = np.zeros(len(ks))
    for sex in sexes:
        vals = np.array([c["hours_by_sex"].get(sex, 0.0) for c in clients])
        bars(ax_h, vals, bottom, label=sex)
        bottom += vals
    ax_h.set(xlabel="client", ylabel="hours", title="audio per client", **ticks)
    ax_h.legend(title="sex", fontsize="small")
    bars(ax_s, np.array([c["speakers"] for c in clients], dtype=float), np.zeros(len(ks)), color="tab:gray")
    ax_s.set(xlabel="client", ylabel="speakers", title="speakers per client", **ticks)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _clear_stale(out: Path, num_clients: int, new_tsvs: dict[Path, str]) -> None:
    """Removes client folders this run does not make, and k-means targets of clients whose
    manifests change: never a mix of old and new partitions under ``out``."""
    for d in sorted(out.glob("client_*")):
        suffix = d.name.removeprefix("client_")
        if d.is_dir() and suffix.isdigit() and int(suffix) >= num_clients:
            log.warning("removing %s: left from an earlier run with more clients", d)
            shutil.rmtree(d)
    any_changed = False
    for k in range(num_clients):
        d = client_dir(out, k)
        mine = [(d / f"{split}.tsv", new_tsvs[d / f"{split}.tsv"]) for split in SPLITS]  # not every client's: O(N)
        changed = any(not p.is_file() or p.read_text() != text for p, text in mine)
        any_changed |= changed
        stale = [d / name for name in TARGET_FILES if (d / name).exists()]
        if changed and stale:
            log.warning("%s: partition changed, removing its old k-means targets (%s)", d,
                        ", ".join(p.name for p in stale))
            for p in stale:
                p.unlink()
    shared = [out / name for name in SHARED_TARGET_FILES if (out / name).exists()]
    if any_changed and shared:  # they describe (or made) targets of clients that changed
        log.warning("%s: partition changed, removing %s", out, ", ".join(p.name for p in shared))
        for p in shared:
            p.unlink()


def partition_corpus(cfg: Config) -> dict:
    """partition_data.py: scan, assign clients, split valid, write every output. Returns the summary."""
    d, p = cfg.data, cfg.partition
    root = Path(d.librispeech_root).expanduser().resolve()
    out = Path(d.partitions_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"data.partitions_dir {out} exists and is not a folder")
    all_rows, rejects = scan_corpus(root, d.subsets, d.sample_rate, d.min_audio_length, d.scan_workers,
                                    require_transcripts=d.require_transcripts)
    kept, held = split_heldout(all_rows, p.heldout_per_speaker, np.random.default_rng(derive_seed(cfg.seed, "heldout")))
    rows, heldout = [all_rows[i] for i in kept], [all_rows[i] for i in held]
    clients = assign_clients(rows, cfg)
    splits = []
    for k, idx in enumerate(clients):
        train, valid = split_valid(rows, idx, p.valid_fraction, np.random.default_rng([cfg.seed, k]))
        splits.append({"train": [rows[i] for i in train], "valid": [rows[i] for i in valid]})

    summaries = [client_summary(k, s) for k, s in enumerate(splits)]
    summary = {
        "method": p.method, "seed": cfg.seed, "num_clients": p.num_clients,
        "dirichlet_alpha": p.dirichlet_alpha if p.method == "dirichlet" else None,
        "valid_fraction": p.valid_fraction, "sample_rate": d.sample_rate, "librispeech_root": str(root),
        "subsets": sorted({r.subset for r in rows}), "hours": _hours(rows), "utterances": len(rows),
        "speakers": len({r.speaker for r in rows}), "rejected": len(rejects),
        "untranscribed": sum(not r.transcript for r in all_rows), "clients": summaries,
        "heldout_per_speaker": p.heldout_per_speaker, "heldout_utterances": len(heldout),
        "heldout_hours": _hours(heldout),
    }
    tsvs = {client_dir(out, k) / f"{split}.tsv": tsv_text(root, s[split])
            for k, s in enumerate(splits) for split in SPLITS}
    tsvs[out / "heldout.tsv"] = tsv_text(root, heldout)

    # All checks passed: from here on only writes.
    _clear_stale(out, p.num_clients, tsvs)
    write_csv(out / "manifest.csv", CSV_COLUMNS, all_rows)
    write_csv(out / "heldout.csv", CSV_COLUMNS, heldout)
    write_csv(out / "rejects.csv", REJECT_COLUMNS, rejects)
    for k, s in enumerate(splits):
        for split in SPLITS:
            write_csv(client_dir(out, k) / f"{split}.csv", CSV_COLUMNS, s[split])
    for path, text in tsvs.items():
        atomic_write_text(path, text)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_summary(out / "summary.png", summaries,
                 f"{p.method} partition, {p.num_clients} clients, {summary['hours']:.2f} h")
    for c in summaries:
        log.info("client_%d: %.3f h, %d utterances (%d valid), %d speakers %s", c["client"], c["hours"],
                 c["utterances"], c["valid"]["utterances"], c["speakers"], c["speakers_by_sex"])
    log.info("wrote %s (%d utterances, %d held out for evaluation, %d rejected)", out, len(all_rows), len(heldout),
             len(rejects))
    return summary

