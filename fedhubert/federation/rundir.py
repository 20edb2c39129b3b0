"""One checkpoint folder, one run. A fresh run never writes into a folder that holds an earlier run: it
refuses, or (``--overwrite``) first renames that folder to ``<folder>.old-<time>``; nothing is ever
deleted. ``--resume`` continues only a run whose checkpoints were made with a compatible config.
The evaluation's folder follows the same rule per config (:func:`check_earlier_output`): a run of the
config that made it replaces its table whole; a run of another config refuses, or moves it aside.

The simulation checks this before Ray starts, and the ServerApp again before it writes anything (the
only check of a deployment, ``flwr run``, whose run config carries ``resume`` and ``overwrite``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhubert.config import Config
from fedhubert.errors import ConfigError, FederationError

if TYPE_CHECKING:
    from fedhubert.federation.tasks import FederatedTask

log = logging.getLogger(__name__)
ROUND_FILE = re.compile(r"round_(\d+)\.pt$")
# What a run writes into its folder (server_app.py, metrics.py, the clients' heads).
RUN_ENTRIES = ("server", "clients", "metrics.jsonl", "tensorboard", "curves.png")
HOW_TO = ("continue it with --resume, give this run another {key}, or pass --overwrite to move the earlier "
          "run aside (flwr run: resume=true or overwrite=true in --run-config)")


def round_files(server_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of every ``round_<r>.pt`` in ``server_dir``, oldest first; never the
    ``.round_<r>.pt.<random>.tmp`` a killed write can leave behind (fileio.atomic_path)."""
    found = [(int(m.group(1)), p) for p in server_dir.glob("round_*.pt") if (m := ROUND_FILE.search(p.name))]
    return sorted(found)


def earlier_run(folder: Path) -> list[str]:
    """What an earlier run left in ``folder`` (``server/``, ``metrics.jsonl``, ...); empty if nothing."""
    def present(path: Path) -> bool:
        return any(path.iterdir()) if path.is_dir() else path.exists()

    return [name + ("/" if (folder / name).is_dir() else "") for name in RUN_ENTRIES if present(folder / name)]


def dotted(values: dict[str, Any], key: str) -> Any:
    """``values["model"]["hidden_size"]`` for ``key`` "model.hidden_size" (a Config.to_dict()); None
    when a section or key is missing (a checkpoint from before the key existed)."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def prepare_checkpoint_dir(cfg: Config, task: FederatedTask, labels: dict[str, Any], *, resume: bool,
                           overwrite: bool) -> tuple[int, Path] | None:
    """Before anything of the run is written (``cfg`` with absolute paths, ``labels`` the task's
    check_label_space answer): a fresh run gets an unused folder, or with ``overwrite`` the earlier
    run is moved aside; ``resume`` returns (round, path) of the newest round checkpoint after
    :func:`check_resume`. One-line errors say what to do."""
    folder = task.checkpoint_dir(cfg)
    if resume and overwrite:
        raise FederationError("--resume and --overwrite exclude each other: continue the run in "
                              f"{folder}, or move it aside and start afresh")
    if resume:
        return check_resume(cfg, task, labels)
    found = earlier_run(folder)
    if found and not overwrite:
        raise FederationError(f"{folder} holds an earlier run ({', '.join(found)}); a new run would mix with "
                              f"it: {HOW_TO.format(key=task.checkpoint_key)}")
    if found:
        move_aside(cfg, task, folder)
    return None


def move_aside(cfg: Config, task: FederatedTask, folder: Path) -> Path:
    """:func:`move_folder_aside` for a federated task: refuses when ``folder`` holds its data or teacher."""
    return move_folder_aside(cfg, folder, task.input_keys, task.checkpoint_key)


def move_folder_aside(cfg: Config, folder: Path, input_keys: tuple[str, ...], folder_key: str) -> Path:
    """Renames ``folder`` to ``<folder>.old-<YYYYmmdd-HHMMSS>[-n]`` beside it; refuses when the folder
    holds something this run reads (a path of ``input_keys``) or the working directory."""
    values = cfg.to_dict()
    reads = {key: dotted(values, key) for key in input_keys}
    reads["the working directory"] = os.getcwd()
    here = folder.resolve()
    for key, value in reads.items():
        path = Path(value).resolve() if value else None
        if path is not None and (path == here or here in path.parents):
            raise FederationError(f"--overwrite would move {folder} aside, but it holds {key} ({path}), which "
                                  f"this run needs: give this run another {folder_key}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while target.exists():  # never rename onto anything (an empty folder would be replaced)
        n += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    os.rename(folder, target)
    log.warning("--overwrite: moved the earlier run aside: %s -> %s", folder, target)
    return target


def changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two Config.to_dict()s (a key only one has counts)."""
    keys = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{name}.")
        elif a != b:
            keys.append(f"{prefix}{name}")
    return keys


def check_earlier_output(cfg: Config, folder: Path, record: Path, folder_key: str, input_keys: tuple[str, ...],
                         overwrite: bool, ignore: tuple[str, ...] = ()) -> None:
    """For a stage whose outputs a rerun of the same config replaces whole (atomically, file by file), and
    whose ``record`` (a JSON file in ``folder``) holds the ``config`` that made them: a run of another
    config (any key but ``ignore``) refuses in one line, or with ``overwrite`` moves ``folder`` aside
    (:func:`move_folder_aside`), so one folder never holds the tables or caches of two configs."""
    if not record.is_file():
        return
    try:
        saved = json.loads(record.read_text()).get("config")
    except (ValueError, AttributeError):
        saved = None
    if isinstance(saved, dict):
        differ = [key for key in changed_keys(saved, cfg.to_dict()) if key not in ignore]
    else:
        differ = ["its config is not recorded"]
    if not differ:
        return
    if overwrite:
        move_folder_aside(cfg, folder, input_keys, folder_key)
        return
    shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
    raise ConfigError(f"{folder} holds the outputs of another config ({record.name}: {shown}); this run would "
                      f"replace them: give this run another {folder_key}, or pass --overwrite to move the earlier "
                      "outputs aside")


def _labels(extras: dict[str, Any]) -> str:
    sha1 = extras.get("codebook_sha1")
    return f"kmeans.codebook=federated, codebook.npy SHA-1 {sha1[:12]}" if sha1 else "kmeans.codebook=local"


def check_resume(cfg: Config, task: FederatedTask, labels: dict[str, Any]) -> tuple[int, Path]:
    """(round, path) of the newest round checkpoint of the task's folder, after checking that it was
    made with the same ``task.run_keys`` (model shapes, partitions, codebook mode; training knobs such as
    the number of rounds may change) and on the same labels (codebook SHA-1, targets.json)."""
    from fedhubert.checkpoint import CONFIG_KEY, read_checkpoint

    server = task.checkpoint_dir(cfg) / "server"
    rounds = round_files(server)
    if not rounds:
        raise FederationError(f"--resume: no round_<r>.pt in {server} (nothing to continue; a fresh run needs no --resume)")
    last_round, path = rounds[-1]
    state = read_checkpoint(path, mmap=True)  # the config and extras only: the weights stay on disk
    saved, current = state.get(CONFIG_KEY, {}), cfg.to_dict()
    differ = [key for key in task.run_keys if dotted(saved, key) is not None and dotted(saved, key) != dotted(current, key)]
    if differ:
        values = "; ".join(f"{key}={dotted(saved, key)!r} (config: {dotted(current, key)!r})" for key in differ)
        raise ConfigError(f"--resume: {path} was made with {values}; a run cannot change {', '.join(differ)}: "
                          f"resume with the run's values, or start a new run (another {task.checkpoint_key}, "
                          "or --overwrite)")
    if state.get("codebook_sha1") != labels.get("codebook_sha1"):
        raise FederationError(f"--resume: {path} was trained on other labels ({_labels(state)}) than the "
                              f"config's ({_labels(labels)}): a head of one label space cannot go on in another; "
                              f"start a new run (another {task.checkpoint_key})")
    from fedhubert.targets import targets_differ  # torchaudio, scikit-learn: only where needed

    changed = targets_differ(state["targets"], labels["targets"]) if "targets" in state and "targets" in labels else []
    if changed:
        raise FederationError(f"--resume: the targets changed since {path} was trained on them (targets.json: "
                              f"{'; '.join(changed)}): start a new run (another {task.checkpoint_key})")
    return last_round, path
