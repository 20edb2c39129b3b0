"""Fit MFCC k-means on the clients' train splits and write their frame labels.

kmeans.codebook=local (default): one k-means model per client; writes client_<k>/train.km, valid.km
(one line of cluster ids per .tsv line) and kmeans.joblib under data.partitions_dir.
kmeans.codebook=federated: one codebook for all clients by federated k-means (a Flower simulation,
fedhubert/federation/kmeans_app.py); each client writes its own train.km and valid.km, the server
codebook.npy and kmeans_metrics.jsonl. Run partition_data.py with the same config first.
"""

from fedhubert.cli import config_from_args, parser_with_config, run_main


def main() -> None:
    parser = parser_with_config(__doc__.splitlines()[0])
    parser.add_argument("--clients", default=None, metavar="K[,K...]",
                        help="only these clients, e.g. 0,2 (default: every client; kmeans.codebook=local only)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    from fedhubert.targets import generate_targets  # heavy imports (torch) after the config checks

    generate_targets(cfg, args.clients)


if __name__ == "__main__":
    run_main(main)
