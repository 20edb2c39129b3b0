#!/usr/bin/env python
"""A LibriSpeech-960-shaped corpus for scale tests, built in seconds from the bundled real utterances.

    python scripts/make_scale_corpus.py --out /data/ls960_shaped                   # 2,338 x 120 = 280,560 files
    python scripts/make_scale_corpus.py --out /tmp/ls_small --speakers 64 --utterances 4

``--out`` becomes a LibriSpeech root in the released layout (``data.librispeech_root``): SPEAKERS.TXT
(the corpus' real reader list), LICENSE.TXT, and ``<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac``
with one ``<spk>-<chapter>.trans.txt`` per chapter. The speakers are LibriSpeech-960's real training
readers (251 in train-clean-100, 921 in train-clean-360, 1,166 in train-other-500: 2,338 in all), each
in the subset SPEAKERS.TXT gives it; fewer ``--speakers`` take an evenly spaced selection of them (so
all three subsets keep their shares), more add made-up readers (ids above the real ones, listed in
SPEAKERS.TXT, in train-other-500). Every speaker gets ``--utterances`` utterances (the same count for
all: the real corpus has 281,241 over 2,338 speakers, 120.3 on average), in chapters of at most
``--per-chapter``.

The audio is the bundled corpus' 100 files reused round-robin, as hard links (copies when the output
is on another filesystem), each with its source's transcript: the content does not matter for what
the tree is for (manifest, partition, target and simulation scale), the layout and the counts do.
The tree is built in a hidden temporary folder beside ``--out`` and renamed onto it when complete; an
existing ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedhubert.cli import run_main  # noqa: E402
from fedhubert.errors import ConfigError, DataError  # noqa: E402
from fedhubert.librispeech import SPEAKERS_FILE, read_transcripts  # noqa: E402

BUNDLED = ROOT / "corpus" / "LibriSpeech"
TRAIN_SUBSETS = ("train-clean-100", "train-clean-360", "train-other-500")
EXTRA_SUBSET = "train-other-500"  # the largest subset takes made-up readers beyond the real 2,338


def training_readers(speakers_txt: Path) -> list[tuple[str, str, str]]:
    """(id, sex, subset) of every reader SPEAKERS.TXT assigns to a training subset, by id."""
    readers = []
    for line in speakers_txt.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = [p.strip() for p in line.split("|", 4)]
        if len(parts) >= 3 and not line.lstrip().startswith(";") and parts[2] in TRAIN_SUBSETS:
            readers.append((parts[0], parts[1], parts[2]))
    return sorted(readers, key=lambda r: int(r[0]))


def choose_readers(real: list[tuple[str, str, str]], count: int) -> list[tuple[str, str, str]]:
    """``count`` readers: an evenly spaced selection of the real ones, or all of them and made-up ones."""
    if count <= len(real):
        return [real[i * len(real) // count] for i in range(count)]
    first = max(int(r[0]) for r in real) + 1
    extra = [(str(first + i), "FM"[i % 2], EXTRA_SUBSET) for i in range(count - len(real))]
    return real + extra


def bundled_utterances(root: Path) -> list[tuple[Path, str]]:
    """(flac, transcript) of every bundled utterance, sorted by path."""
    found = []
    for chapter in sorted({p.parent for p in root.glob("*/*/*/*.flac")}):
        texts = read_transcripts(sorted(str(t) for t in chapter.glob("*.trans.txt")))
        found += [(f, texts[f.stem]) for f in sorted(chapter.glob("*.flac")) if f.stem in texts]
    if not found:
        raise DataError(f"no transcribed .flac files under {root}: the bundled corpus is missing")
    return found


def place(source: Path, target: Path, link: list[bool]) -> None:
    """Hard-links ``source`` to ``target``; after the first cross-filesystem failure, copies."""
    if link[0]:
        try:
            os.link(source, target)
            return
        except OSError:  # EXDEV (another filesystem) or a filesystem without hard links
            link[0] = False
    shutil.copyfile(source, target)


def build(out: Path, speakers: int, utterances: int, per_chapter: int) -> dict:
    """Writes the tree into a temporary folder beside ``out``, then renames it onto ``out``."""
    if out.exists():
        raise ConfigError(f"--out {out} already exists: remove it or choose another folder")
    if speakers < 1 or utterances < 1 or per_chapter < 1:
        raise ConfigError("--speakers, --utterances and --per-chapter must be at least 1")
    sources = bundled_utterances(BUNDLED)
    readers = choose_readers(training_readers(BUNDLED / SPEAKERS_FILE), speakers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    link, n = [True], 0
    try:
        lines = (BUNDLED / SPEAKERS_FILE).read_text(encoding="utf-8").rstrip("\n").splitlines()
        real_ids = {r[0] for r in training_readers(BUNDLED / SPEAKERS_FILE)}
        lines += [f"{rid:<5}| {sex} | {subset:<16} | 25.00 | made-up reader {rid}"
                  for rid, sex, subset in readers if rid not in real_ids]
        (tmp / SPEAKERS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        shutil.copyfile(BUNDLED / "LICENSE.TXT", tmp / "LICENSE.TXT")
        for s, (rid, _, subset) in enumerate(readers):
            for c0 in range(0, utterances, per_chapter):
                chapter = str(100 + c0 // per_chapter)  # chapter ids are only unique per speaker here
                folder = tmp / subset / rid / chapter
                folder.mkdir(parents=True)
                trans = []
                for u in range(c0, min(c0 + per_chapter, utterances)):
                    source, text = sources[(s * utterances + u) % len(sources)]
                    utt = f"{rid}-{chapter}-{u - c0:04d}"
                    place(source, folder / f"{utt}.flac", link)
                    trans.append(f"{utt} {text}\n")
                    n += 1
                (folder / f"{rid}-{chapter}.trans.txt").write_text("".join(trans), encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    per_subset = {name: sum(r[2] == name for r in readers) for name in TRAIN_SUBSETS}
    return {"root": str(out), "speakers": len(readers), "utterances": n, "speakers_per_subset": per_subset,
            "hard_links": link[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the LibriSpeech root to create (must not exist)")
    parser.add_argument("--speakers", type=int, default=2338, help="readers (default 2338: LibriSpeech-960's)")
    parser.add_argument("--utterances", type=int, default=120, help="utterances per reader (default 120)")
    parser.add_argument("--per-chapter", type=int, default=40, help="utterances per chapter (default 40)")
    args = parser.parse_args()
    start = time.perf_counter()
    info = build(Path(args.out).expanduser().resolve(), args.speakers, args.utterances, args.per_chapter)
    how = "hard links" if info["hard_links"] else "copies"
    print(f"wrote {info['root']}: {info['speakers']} speakers {info['speakers_per_subset']}, "
          f"{info['utterances']} utterances ({how}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
