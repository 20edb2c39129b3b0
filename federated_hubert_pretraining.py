#!/usr/bin/env python
"""Federated HuBERT pretraining: a Flower FedAdam simulation over the clients made by
partition_data.py and generate_kmeans_targets.py. See README.md, "Federated pretraining"."""

from fedhubert.cli import federated_main, run_main

if __name__ == "__main__":
    run_main(lambda: federated_main("pretraining", __doc__, "pretraining_config.yaml"))
