"""s3prl 0.4.18's downstream runner (``run_downstream.py``), made to run on this stack.

s3prl parses its own arguments; we check a few of them first and patch what breaks, then call
``s3prl.run_downstream.main()``. What breaks, and what we do (each has a test in
tests/test_s3prl_downstream.py):

- torchaudio >= 2.9 lacks names s3prl uses: ``fedhubert.compat`` (imported first).
- ``speech_commands`` imports ``catalyst`` (only for distributed training) and ``voxceleb1`` imports
  ``librosa`` (``find_files``, never called): stand-in modules when the real ones are not installed.
- torch >= 2.6 loads with ``weights_only=True``; s3prl's own ``states-*.ckpt`` (``-e``, ``-i``) hold an
  ``argparse.Namespace``: allowed as a safe global (plain data, no code runs).
- A train loader with no batch (``drop_last=True`` and fewer files than the batch size, or no files)
  makes ``Runner.train`` loop forever; an empty eval loader divides by zero: a one-line DataError.
- ``voxceleb1`` caches its file lists as pickles inside site-packages, keyed only by split (another
  root would reuse them): redirected to ``<expdir>/voxceleb1_cache/<hash of file_path, meta_data>/``.
- ``Runner.evaluate`` enters ``torch.cuda.device(args.device)`` whenever CUDA exists, which raises for
  ``--device cpu``: with a non-CUDA device, CUDA is hidden from it.
- Missing data paths fail late with tracebacks, and a malformed ``-o`` with "not enough values to
  unpack": checked up front with errors naming the key.
- ``-u hubert_local -k FILE``: FILE is read with our safe loader first (checkpoint.load_plain), so a file
  holding pickled objects is refused in one line naming it, whatever torch's weights_only default.
"""

from __future__ import annotations

import fedhubert.compat  # noqa: F401  (before s3prl: torchaudio names it imports)

import argparse
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from fedhubert.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Data paths each task reads from downstream_expert.datarc: (key, "dir" or "file").
TASK_PATHS: dict[str, tuple[tuple[str, str], ...]] = {
    "speech_commands": (("speech_commands_root", "dir"), ("speech_commands_test_root", "dir")),
    "voxceleb1": (("file_path", "dir"), ("meta_data", "file")),
}
VOXCELEB1_CACHE = "voxceleb1_cache"


# --- arguments ----------------------------------------------------------------------------------------

def _value(argv: Sequence[str], *flags: str) -> str | None:
    """The value of the last ``-x VALUE`` / ``--flag=VALUE`` in ``argv`` (argparse's rule), else None."""
    found = None
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                found = argv[i + 1]
            elif flag.startswith("--") and arg.startswith(flag + "="):
                found = arg.split("=", 1)[1]
    return found


def check_overrides(text: str) -> list[tuple[str, str]]:
    """Checks s3prl's ``-o`` syntax: ``config.a.b=value`` or ``args.name=value`` items joined by ``,,``.
    s3prl splits each item on every ``=`` and fails with a bare unpacking error otherwise."""
    if text.strip().lower() == "none":
        return []
    items = []
    for option in text.split(",,"):
        option = option.strip()
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or "=" in value:
            raise ConfigError(f"-o item {option!r} must be key=value with exactly one '=' (items are joined by ',,')")
        head, _, rest = key.partition(".")
        if head not in ("config", "args") or not rest or (head == "args" and "." in rest):
            raise ConfigError(f"-o key {key!r} must be config.<section>.<key>... or args.<name>")
        items.append((key, value.strip()))
    return items


def check_arguments(argv: Sequence[str]) -> None:
    """What s3prl would only find out with a traceback (or not at all): no config, a missing -c file, a bad
    -o, a hubert_local -k file that is missing or holds pickled objects, a CUDA device on a machine without one."""
    override = _value(argv, "-o", "--override")
    if override is not None:
        check_overrides(override)
    resuming = _value(argv, "-e", "--past_exp") is not None or "-a" in argv or "--auto_resume" in argv
    config = _value(argv, "-c", "--config")
    task = _value(argv, "-d", "--downstream")
    if resuming:
        pass  # the config comes from the checkpoint
    elif config is None:
        # s3prl defaults to ./downstream/<task>/config.yaml: only inside a clone of its repository.
        if task and not Path(f"downstream/{task}/config.yaml").is_file():
            raise ConfigError(f"no -c/--config given and ./downstream/{task}/config.yaml does not exist; pass "
                              f"-c configs/s3prl/{task}.yaml or the task's config.yaml from the s3prl repository")
    elif not Path(config).is_file():
        raise ConfigError(f"-c config file not found: {config}")
    checkpoint = _value(argv, "-k", "--upstream_ckpt")
    if _value(argv, "-u", "--upstream") == "hubert_local" and checkpoint is not None:
        from fedhubert.checkpoint import read_checkpoint

        # s3prl's torch.load relies on torch's default (weights_only unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is
        # set): our safe load first refuses a file with pickled objects, and names a missing or foreign one
        read_checkpoint(checkpoint, mmap=True)
    device = _value(argv, "--device") or "cuda"  # s3prl's default; -e keeps the command line's device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} (s3prl's default is cuda) but CUDA is not available; pass --device cpu")


# --- stand-ins and checkpoints -----------------------------------------------------------------------

def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name, "stand-in from fedhubert.s3prl_runner (the real package is not installed)")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() needs one
    module.__dict__.update(attrs)
    return module


def _unavailable(what: str, why: str) -> Callable[..., Any]:
    def stand_in(*_: Any, **__: Any) -> Any:
        raise NotImplementedError(f"{what} needs the real package ({why}); it is not installed")
    return stand_in


class DistributedSamplerWrapper:
    """Stand-in for catalyst's: s3prl's speech_commands wraps its sampler with it only when
    torch.distributed is initialised (multi-GPU training), which needs the real catalyst."""

    def __init__(self, *_: Any, **__: Any) -> None:
        _unavailable("catalyst.data.sampler.DistributedSamplerWrapper",
                     "distributed speech_commands training; pip install catalyst")()


def install_stand_ins() -> list[str]:
    """Registers stand-ins for catalyst and librosa (only those names s3prl imports and never calls
    in a single-process run) when they are not installed. Returns the module names it registered."""
    stand_ins = {
        # speech_commands/expert.py: `from catalyst.data.sampler import DistributedSamplerWrapper`
        "catalyst": {"catalyst.data": {}, "catalyst.data.sampler": {"DistributedSamplerWrapper": DistributedSamplerWrapper}},
        # voxceleb1/dataset.py: `from librosa.util import find_files` (unused there)
        "librosa": {"librosa.util": {"find_files": _unavailable("librosa.util.find_files", "pip install librosa")}},
    }
    added = []
    for top, children in stand_ins.items():
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            continue  # the real package wins
        sys.modules[top] = _module(top)
        added.append(top)
        for name, attrs in children.items():
            sys.modules[name] = module = _module(name, **attrs)
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)
            added.append(name)
    return added


def allow_s3prl_checkpoints() -> None:
    """s3prl's states-*.ckpt store the run's arguments as an argparse.Namespace (strings, numbers)."""
    torch.serialization.add_safe_globals([argparse.Namespace])


# --- Runner patches ----------------------------------------------------------------------------------

def check_task_paths(task: str, config: dict) -> None:
    """Each data path the task reads exists (after -o overrides), or a DataError naming its key."""
    datarc = config.get("downstream_expert", {}).get("datarc", {})
    for key, kind in TASK_PATHS.get(task, ()):
        if key not in datarc:
            raise ConfigError(f"config key downstream_expert.datarc.{key} is missing (task {task})")
        path = Path(str(datarc[key]))
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            raise DataError(f"config key downstream_expert.datarc.{key}: {kind} not found: {path}")


def voxceleb1_cache_dir(expdir: str | os.PathLike, datarc: dict) -> Path:
    """Where voxceleb1's file-list pickles go: per experiment, and per (file_path, meta_data) version."""
    meta = Path(str(datarc["meta_data"])).resolve()
    stat = meta.stat()
    ident = [str(Path(str(datarc["file_path"])).resolve()), str(meta), stat.st_size, stat.st_mtime_ns]
    return Path(expdir) / VOXCELEB1_CACHE / hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:12]


def _batch_key(datarc: dict, mode: str, batch_size: int | None) -> str:
    for key in (f"{mode}_batch_size", "train_batch_size" if mode == "train" else "eval_batch_size", "batch_size"):
        if datarc.get(key) == batch_size:
            return key
    return "batch_size"


def check_loader(loader: Any, mode: str, datarc: dict) -> None:
    """Raises DataError if ``loader`` yields no batch (Runner.train would loop forever)."""
    try:
        batches = len(loader)
    except TypeError:
        return  # an iterable without a length: nothing to check
    if batches > 0:
        return
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else 0
    batch_size = getattr(loader, "batch_size", None)
    if size == 0:
        raise DataError(f"s3prl split '{mode}' has no examples: check the data paths in downstream_expert.datarc")
    key = _batch_key(datarc, mode, batch_size)
    raise DataError(f"s3prl split '{mode}' has {size} examples, fewer than one batch "
                    f"(downstream_expert.datarc.{key}={batch_size}, drop_last); lower it, e.g. "
                    f"-o config.downstream_expert.datarc.{key}={size}")


def _guard_dataloaders(model: Any, datarc: dict) -> None:
    get_dataloader = model.get_dataloader

    @functools.wraps(get_dataloader)
    def checked(mode: str, *args: Any, **kwargs: Any) -> Any:
        loader = get_dataloader(mode, *args, **kwargs)
        check_loader(loader, mode, datarc)
        return loader

    model.get_dataloader = checked  # Runner calls the expert through this attribute


@contextlib.contextmanager
def cuda_hidden() -> Iterator[None]:
    """torch.cuda.is_available() is False inside the block."""
    original = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = original


def patch_runner(runner_cls: type) -> None:
    """Patches s3prl's Runner class in place (idempotent)."""
    if getattr(runner_cls, "_fedhubert_patched", False):
        return
    get_downstream, evaluate = runner_cls._get_downstream, runner_cls.evaluate

    def _get_downstream(self: Any) -> Any:
        task, datarc = self.args.downstream, self.config.get("downstream_expert", {}).get("datarc", {})
        check_task_paths(task, self.config)
        if task == "voxceleb1":
            import s3prl.downstream.voxceleb1.dataset as vox

            vox.CACHE_PATH = str(voxceleb1_cache_dir(self.args.expdir, datarc)) + os.sep
            log.info("voxceleb1 file lists cached in %s", vox.CACHE_PATH)
        entry = get_downstream(self)
        _guard_dataloaders(entry.model, datarc)
        return entry

    def _evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.device(self.args.device).type == "cuda":
            return evaluate(self, *args, **kwargs)
        with cuda_hidden():  # it would enter torch.cuda.device("cpu") when a GPU exists
            return evaluate(self, *args, **kwargs)

    runner_cls._get_downstream, runner_cls.evaluate = _get_downstream, _evaluate
    runner_cls._fedhubert_original = {"_get_downstream": get_downstream, "evaluate": evaluate}
    runner_cls._fedhubert_patched = True


def prepare() -> list[str]:
    """Everything main() does before handing over to s3prl (tests call it to build Runners in-process).
    Returns the stand-in module names it registered."""
    added = install_stand_ins()
    if added:
        log.info("stand-ins for modules s3prl imports but does not use here: %s", ", ".join(added))
    allow_s3prl_checkpoints()
    from s3prl.downstream.runner import Runner

    patch_runner(Runner)
    return added


def main(argv: Sequence[str] | None = None) -> None:
    """``run_downstream.py`` with ``argv`` (default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help"} & set(argv):  # --help: s3prl's own list of its arguments, whatever else is given
        check_arguments(argv)
    from s3prl import run_downstream

    prepare()
    sys.argv = [sys.argv[0], *argv]  # s3prl parses sys.argv itself
    run_downstream.main()
