#!/usr/bin/env python
"""Load the best global model with s3prl's hubert_local upstream (as `run_downstream.py -u hubert_local
-k CKPT` does) and run one real utterance through it."""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    args = parser_with_config(__doc__).parse_args()
    from fedhubert.evaluate import check_s3prl_load
    print(f"s3prl hubert_local: {check_s3prl_load(config_from_args(args))} hidden states")


if __name__ == "__main__":
    run_main(main)
