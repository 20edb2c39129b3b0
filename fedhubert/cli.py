"""Shared plumbing of the top-level scripts: config flags, logging, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from fedhubert.config import REPO_ROOT, Config, describe_keys, load_config
from fedhubert.errors import FedHubertError

PATH_RULE = ("Relative paths (--config, and every path key in a config file or --set) are relative to the "
             "folder the command runs in; only 'extends:' is relative to the file that names it. The bundled "
             "configs' paths (corpus/LibriSpeech, demo_output/, checkpoints/ ...) are relative to the "
             "repository root.")


class HelpConfig(argparse.Action):
    """``--help-config``: every config key with its type, default, valid values and meaning, then exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list every config key (type, default, valid values, meaning) and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(help_config())
        parser.exit()


def help_config() -> str:
    """The text of ``--help-config``: one line per key, then its meaning indented."""
    lines = ["Config keys (YAML sections, or --set section.key=value):", ""]
    for key, type_name, default, meaning, valid in describe_keys():
        lines.append(f"{key} ({type_name}; default {default!r}{'; ' + valid if valid else ''})")
        lines.append(f"    {meaning}")
    return "\n".join(lines + ["", PATH_RULE])


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str = "pretraining_config.yaml") -> None:
    """The ``--config``, repeatable ``--set`` and ``--help-config`` flags every script with a config takes;
    ``default_config`` is a file in the repository's configs/."""
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / default_config),
                        help="YAML config file, relative to the current folder (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable, e.g. --set partition.num_clients=3")
    parser.add_argument("--help-config", action=HelpConfig)


def parser_with_config(description: str, default_config: str = "pretraining_config.yaml") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=PATH_RULE)
    add_config_arguments(parser, default_config)
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
    """The federated stages' command line: --config (default: ``default_config``, a file in configs/ or any
    path), --set, --resume or --overwrite; runs ``task`` as a simulation."""
    parser = parser_with_config(description, default_config)
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
