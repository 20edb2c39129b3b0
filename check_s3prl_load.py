#!/usr/bin/env python
"""Load the best global model (--student: the best distilled student; --checkpoint: any file) with s3prl's
hubert_local upstream (as `run_downstream.py -u hubert_local -k CKPT` does) and run one real utterance
through it."""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    parser = parser_with_config(__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--student", action="store_true", help="the config's best_student_model.pt")
    which.add_argument("--checkpoint", help="any checkpoint file")
    args = parser.parse_args()
    cfg = config_from_args(args)
    from fedhubert.evaluate import best_checkpoint, check_s3prl_load  # imports s3prl: once the keys are fine
    path = args.checkpoint or best_checkpoint(cfg, student=args.student)
    print(f"s3prl hubert_local: {check_s3prl_load(cfg, path)} hidden states ({path})")


if __name__ == "__main__":
    run_main(main)
