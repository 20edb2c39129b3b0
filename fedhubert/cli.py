"""Shared plumbing of the top-level scripts: config flags, logging, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from fedhubert.config import Config, add_config_arguments, load_config
from fedhubert.errors import FedHubertError


def parser_with_config(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config, and training.device / training.precision checked on this machine (the
    simulation's clients run here), before a script writes or starts anything."""
    cfg = load_config(args.config, args.overrides)
    from fedhubert.train import check_device  # imports torch: only once the keys are fine
    check_device(cfg)
    return cfg


def run_main(main: Callable[[], object]) -> None:
    """Runs a script's ``main``; a FedHubertError becomes ``error: <message>`` and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler; don't print twice
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database: a line per migration step
    try:
        main()
    except FedHubertError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """``message`` on one line: a line break inside it (from a key, a path or a value) is shown as ``\\n``."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def federated_main(task: str, description: str, default_config: str) -> None:
    """The federated stages' command line: --config, --set, --resume or --overwrite; runs ``task`` as a
    simulation."""
    parser = parser_with_config(description)
    parser.set_defaults(config=default_config)
    earlier = parser.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true",
                         help="continue from the newest round_<r>.pt of the task's checkpoint folder at round r+1")
    earlier.add_argument("--overwrite", action="store_true",
                         help="the checkpoint folder holds an earlier run: move it aside to <folder>.old-<time> "
                         "(nothing is deleted), then start afresh")
    args = parser.parse_args()
    cfg = config_from_args(args)
    from fedhubert.federation.simulation import run_federated  # imports Flower: only once the flags are fine
    run_federated(task, cfg, resume=args.resume, overwrite=args.overwrite)
