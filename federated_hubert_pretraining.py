#!/usr/bin/env python
"""Federated HuBERT pretraining: a Flower FedAdam simulation over the clients made by
partition_data.py and generate_kmeans_targets.py. See README.md, "Federated pretraining"."""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    parser = parser_with_config(__doc__)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest round_<r>.pt in <checkpoint_dir>/server at round r+1")
    args = parser.parse_args()
    from fedhubert.federation.simulation import run_federated_pretraining
    run_federated_pretraining(config_from_args(args), resume=args.resume)


if __name__ == "__main__":
    run_main(main)
