"""Scan a LibriSpeech root, split it into federated clients and write fairseq manifests.

Writes manifest.csv, rejects.csv, summary.json, summary.png and client_<k>/{train,valid}.{tsv,csv}
under data.partitions_dir. See README ("Data stage") for every output and option.
"""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    args = parser_with_config(__doc__.splitlines()[0]).parse_args()
    cfg = config_from_args(args)
    from fedhubert.partition import partition_corpus  # heavy imports (torch) after the config checks

    partition_corpus(cfg)


if __name__ == "__main__":
    run_main(main)
