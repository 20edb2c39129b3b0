"""A client machine makes its own client folder from its own audio (prepare_client.py): no other client's
file and no central corpus is needed, so the audio never leaves its owner.

The audio folder is either a LibriSpeech root (it holds SPEAKERS.TXT: scanned as partition_data.py scans
one) or any folder of .flac/.wav/.ogg files, found recursively, whose speaker a regular expression with one
group takes from each file's path relative to the folder (default: the first folder name). Either way a
file that cannot be used becomes a rejects.csv row with the reason, as in the LibriSpeech scan.

The client folder gets what partition_data.py and generate_kmeans_targets.py give a ``client_<k>``
folder: train/valid .tsv and .csv (valid split as partition.split_valid deals it), rejects.csv,
summary.json and, with kmeans.codebook=local, train.km, valid.km and kmeans.joblib (targets.folder_targets).
With kmeans.codebook=federated the labels come later, from the federated k-means run.

The .tsv's first line, the audio root, is written relative to the client folder, so moving the client
folder together with its audio needs no edit (data.manifest_entries resolves it); ``--audio-root``
(:func:`rewrite_audio_root`) points the manifests of a folder at audio that moved on its own.

Everything is checked before the first write; each file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from fedhubert.config import Config, num_frames
from fedhubert.data import derive_seed, manifest_entries, read_text
from fedhubert.errors import ConfigError, DataError
from fedhubert.features import feature_threads, make_features
from fedhubert.fileio import atomic_write_text
from fedhubert.librispeech import (CSV_COLUMNS, REJECT_COLUMNS, SPEAKERS_FILE, UNKNOWN_SEX, Reject, Utterance,
                                   measure_audio, read_headers, scan_corpus)
from fedhubert.partition import SPLITS, TARGET_FILES, client_summary, split_valid, tsv_text, write_csv
from fedhubert.targets import cluster_count, fitting_utterances, folder_targets

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")
DEFAULT_SPEAKER_RULE = r"^([^/]+)/"  # <speaker>/<anything>/<file>: the first folder names the speaker
NO_MATCH = "speaker rule did not match"
# Seeds the valid split and the k-means of a prepared folder: not the folder's name or place, so the same
# audio and config always give the same files (and a rerun into a renamed folder is not "another client").
SEED_KEY = "prepared-client"


def speaker_pattern(rule: str) -> re.Pattern:
    """``--speaker-rule`` compiled; it must be a valid regular expression with exactly one group."""
    try:
        pattern = re.compile(rule)
    except re.error as exc:
        raise ConfigError(f"--speaker-rule {rule!r} is not a regular expression ({exc})") from None
    if pattern.groups != 1:
        raise ConfigError(f"--speaker-rule {rule!r} has {pattern.groups} groups; it needs exactly one, the "
                          f"speaker, e.g. {DEFAULT_SPEAKER_RULE!r} (the first folder name)")
    return pattern


def audio_files(root: Path) -> list[Path]:
    """Every .flac/.wav/.ogg file under ``root`` (any depth, any case of suffix), hidden ones left out."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and not p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def scan_folder(root: Path, pattern: re.Pattern, sample_rate: int, min_samples: int,
                workers: int) -> tuple[list[Utterance], list[Reject]]:
    """Manifest rows (sorted by path) and rejects of a folder of audio files; the speaker is the first group
    of ``pattern`` searched in the file's path relative to ``root``, the utterance id that path without
    its suffix, and there are no transcripts (pretraining needs none)."""
    files = audio_files(root)
    if not files:
        raise DataError(f"no {'/'.join(AUDIO_SUFFIXES)} files under {root} (--audio)")
    rejects, found = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        utt_id, match = rel[:-len(path.suffix)], pattern.search(rel)
        if match is None or not match.group(1):
            rejects.append(Reject(rel, utt_id, NO_MATCH))
        else:
            found.append((path, utt_id, match.group(1)))
    rows, unusable = read_headers(lambda f: measure_audio(f[0], root, f[1], f[2], UNKNOWN_SEX, "", "", "",
                                                          sample_rate, min_samples), found, workers)
    rejects = sorted(rejects + unusable, key=lambda r: r.path)
    if rejects:
        log.warning("%d of %d audio files rejected (reasons in rejects.csv)", len(rejects), len(files))
    if not rows:
        raise DataError(f"no usable audio under {root} ({len(rejects)} files rejected, e.g. "
                        f"{rejects[0].path}: {rejects[0].reason})")
    return rows, rejects


def _check_replaces(out: Path, tsvs: dict[Path, str], overwrite: bool) -> bool:
    """Whether the manifests change. A client folder holding other manifests (another client's, or
    audio that changed) is refused unless ``overwrite``."""
    changed = [p for p, text in tsvs.items() if not p.is_file() or p.read_bytes() != text.encode()]
    held = [p for p in changed if p.exists()]
    if held and not overwrite:
        raise DataError(f"{held[0]} holds another client's manifest (not what this audio and config give): "
                        "choose another --out, or pass --overwrite to replace that folder's client files")
    if held:
        log.warning("%s: replacing the client files of different audio (--overwrite)", out)
    return bool(changed)


def prepare_client(cfg: Config, audio: str | Path, out: str | Path, speaker_rule: str | None = None,
                   overwrite: bool = False) -> dict:
    """prepare_client.py: scan ``audio``, split valid, write the client folder ``out`` and (kmeans.codebook
    local) its k-means targets. Returns the folder's summary."""
    d, p = cfg.data, cfg.partition
    audio_dir, out = Path(audio).expanduser().resolve(), Path(out).expanduser().resolve()
    if not audio_dir.is_dir():
        raise DataError(f"audio folder not found: {audio_dir} (--audio)")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    pattern = speaker_pattern(DEFAULT_SPEAKER_RULE if speaker_rule is None else speaker_rule)
    librispeech = (audio_dir / SPEAKERS_FILE).is_file()
    if librispeech:
        if speaker_rule is not None:
            log.warning("--speaker-rule ignored: %s holds %s, speakers come from LibriSpeech file names",
                        audio_dir, SPEAKERS_FILE)
        rows, rejects = scan_corpus(audio_dir, d.subsets, d.sample_rate, d.min_audio_length, d.scan_workers)
    else:
        rows, rejects = scan_folder(audio_dir, pattern, d.sample_rate, d.min_audio_length, d.scan_workers)
    train, valid = split_valid(rows, range(len(rows)), p.valid_fraction,
                               np.random.default_rng(derive_seed(cfg.seed, SEED_KEY)))
    splits = {"train": [rows[i] for i in train], "valid": [rows[i] for i in valid]}
    root_text = os.path.relpath(audio_dir, out)  # a folder that moves with its audio needs no edit
    tsvs = {out / f"{split}.tsv": tsv_text(root_text, splits[split]) for split in SPLITS}
    changed = _check_replaces(out, tsvs, overwrite)
    federated, features = cfg.kmeans.codebook == "federated", None
    if not federated:  # k-means must be possible (a checkpoint that loads, enough frames) before any write
        features = make_features(cfg)
        fit = fitting_utterances(cfg, [r.num_samples for r in splits["train"]], SEED_KEY)
        cluster_count(sum(num_frames(splits["train"][i].num_samples) for i in fit), cfg, out.name)
    summary = {**client_summary(out.name, splits), "audio_kind": "librispeech" if librispeech else "folder",
               "speaker_rule": None if librispeech else pattern.pattern, "seed": cfg.seed,
               "valid_fraction": p.valid_fraction, "sample_rate": d.sample_rate, "rejected": len(rejects),
               "subsets": sorted({r.subset for r in rows}) if librispeech else [], "codebook": cfg.kmeans.codebook}

    # All checks passed: from here on only writes.
    stale = [out / name for name in TARGET_FILES if (out / name).exists()]
    if stale and (changed or (federated and (out / "kmeans.joblib").exists())):
        log.warning("%s: removing k-means targets that are not this audio's%s (%s)", out,
                    "" if changed else " federated labels", ", ".join(s.name for s in stale))
        for path in stale:
            path.unlink()
    write_csv(out / "rejects.csv", REJECT_COLUMNS, rejects)
    for split in SPLITS:
        write_csv(out / f"{split}.csv", CSV_COLUMNS, splits[split])
    for path, text in tsvs.items():
        atomic_write_text(path, text)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("%s: %.3f h, %d utterances (%d valid), %d speakers, %d rejected; audio root %s", out, summary["hours"],
             summary["utterances"], summary["valid"]["utterances"], summary["speakers"], len(rejects), root_text)
    if federated:
        log.info("kmeans.codebook=federated: wrote the manifests only; train.km and valid.km come from the "
                 "federated k-means run (task=\"kmeans\" under the deployment engine, README \"On real machines\")")
        return summary
    with feature_threads(features):
        summary["kmeans"] = folder_targets(cfg, out, SEED_KEY, features)
    return summary


def rewrite_audio_root(out: str | Path, audio_root: str | Path) -> list[Path]:
    """prepare_client.py --audio-root: points every .tsv of the client folder ``out`` at ``audio_root``
    (written relative to ``out``) once every file they list is found there; else one DataError naming
    the first missing file, and nothing is written. Returns the rewritten manifests."""
    out, new = Path(out).expanduser().resolve(), Path(audio_root).expanduser().resolve()
    if not out.is_dir():
        raise DataError(f"client folder not found: {out} (--out)")
    if not new.is_dir():
        raise DataError(f"audio folder not found: {new} (--audio-root)")
    manifests = sorted(out.glob("*.tsv"))
    if not manifests:
        raise DataError(f"{out} holds no .tsv manifest: --out must be a client folder")
    root_text, texts = os.path.relpath(new, out), {}
    for tsv in manifests:
        for lineno, rel, _ in manifest_entries(tsv)[1]:
            if not (new / rel).is_file():
                raise DataError(f"{new / rel} not found (listed in {tsv}:{lineno}): --audio-root must be the "
                                "folder the manifests' paths are relative to; no manifest was changed")
        entries = read_text(tsv, "manifest").partition("\n")[2]  # every line but the root, byte for byte
        texts[tsv] = f"{root_text}\n{entries}"
    for tsv, text in texts.items():
        atomic_write_text(tsv, text)
    log.info("%s: audio root of %s is now %s", out, ", ".join(t.name for t in manifests), root_text)
    return manifests
