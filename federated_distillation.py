#!/usr/bin/env python
"""Federated distillation: the best global model of the pretraining (the teacher, frozen) is distilled
into a smaller student HuBERT by a Flower FedAdam simulation over the same clients. See README.md,
"Federated distillation"."""

from fedhubert.cli import federated_main, run_main

if __name__ == "__main__":
    run_main(lambda: federated_main("distillation", __doc__, "distillation_config.yaml"))
