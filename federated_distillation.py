#!/usr/bin/env python
"""Federated distillation: the best global model of the pretraining (the teacher, frozen) is distilled
into a smaller student HuBERT by a Flower FedAdam simulation over the same clients. See README.md,
"Federated distillation"."""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    parser = parser_with_config(__doc__)
    parser.set_defaults(config="configs/distillation_config.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest round_<r>.pt in <distillation.checkpoint_dir>/server at round r+1")
    args = parser.parse_args()
    from fedhubert.federation.simulation import run_federated_distillation
    run_federated_distillation(config_from_args(args), resume=args.resume)


if __name__ == "__main__":
    run_main(main)
