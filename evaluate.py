#!/usr/bin/env python
"""Evaluate what the models learned, in one table: federated (best global model), centralized (same
model and budget on the pooled data), student (when distillation has run), random-init and MFCC.

Pretrained models are loaded through s3prl's hubert_local upstream. Data: the speaker probes use the
partition's held-out utterances (<partitions_dir>/heldout.csv, partition.heldout_per_speaker per
speaker; else the clients' validation splits), cut into evaluation.segment_seconds segments; the keyword
probe uses evaluation.keywords spoken by espeak-ng voices (synthesized once, cached under
<evaluation.output_dir>/cache), tested on voices it never trained on; masked prediction uses each
client's validation split. Writes evaluation.json, evaluation.md and evaluation.png to
evaluation.output_dir and prints the table. See README.md, "Evaluation"."""

import argparse

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    parser = parser_with_config(__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rows", help="comma-separated subset of evaluation.rows, e.g. federated,mfcc")
    parser.add_argument("--round", type=int, dest="federated_round", metavar="N",
                        help="the federated row is round N's global model (server/round_N.pt, with the clients' "
                        "round-N heads) instead of the best one; compute (and the centralized budget) count rounds 1..N")
    parser.add_argument("--overwrite", action="store_true",
                        help="evaluation.output_dir holds the evaluation of another config: move it aside to "
                        "<folder>.old-<time> (nothing is deleted), then evaluate afresh")
    args = parser.parse_args()
    from fedhubert.eval_rows import run_evaluation
    cfg = config_from_args(args)
    if args.rows:
        args.overrides.append(f"evaluation.rows=[{args.rows}]")
        cfg = config_from_args(args)
    run_evaluation(cfg, federated_round=args.federated_round, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
