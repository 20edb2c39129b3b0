"""Builds a small Speech Commands v0.01-layout set spoken by espeak-ng voices (for s3prl's speech_commands):

    python make_speech_commands.py data/speech_commands_espeak

writes <out>/train (speech_commands_root) and <out>/test (speech_commands_test_root). See
fedhubert/speech_commands.py for the layout and how voices are split into train / valid / test.
"""

import argparse
from pathlib import Path

from fedhubert.cli import run_main
from fedhubert.speech_commands import OTHER_WORDS, SpeechCommandsSpec, build_speech_commands


def main() -> None:
    spec = SpeechCommandsSpec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (built beside it, then renamed into place)")
    parser.add_argument("--train-voices", type=int, default=spec.train_voices)
    parser.add_argument("--valid-voices", type=int, default=spec.valid_voices)
    parser.add_argument("--test-voices", type=int, default=spec.test_voices)
    parser.add_argument("--other-words", type=int, default=spec.other_words,
                        help=f"how many of the {len(OTHER_WORDS)} non-keywords (s3prl's _unknown_) to speak")
    parser.add_argument("--repeats", type=int, default=spec.repeats, help="takes per voice and word")
    parser.add_argument("--noise-seconds", type=float, default=spec.noise_seconds,
                        help="length of each _background_noise_ file (>= 1)")
    parser.add_argument("--seed", type=int, default=spec.seed)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fedhubert" / "espeak",
                        help="espeak-ng synthesis cache ('none' to disable)")
    parser.add_argument("--workers", type=int, default=4, help="espeak-ng processes at a time")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    spec = SpeechCommandsSpec(train_voices=args.train_voices, valid_voices=args.valid_voices,
                              test_voices=args.test_voices, other_words=args.other_words, repeats=args.repeats,
                              noise_seconds=args.noise_seconds, seed=args.seed)
    cache = None if str(args.cache_dir).lower() == "none" else args.cache_dir
    summary = build_speech_commands(args.out, spec, cache, args.workers, args.overwrite)
    files = summary.files
    print(f"wrote {args.out}: train folder {files['training']} training + {files['validation']} validation + "
          f"{files['testing']} testing clips and {files['noise']} noise files; test folder {files['test']} clips")
    print(f"s3prl: -o \"config.downstream_expert.datarc.speech_commands_root={summary.train_root.resolve()},,"
          f"config.downstream_expert.datarc.speech_commands_test_root={summary.test_root.resolve()}\"")


if __name__ == "__main__":
    run_main(main)
