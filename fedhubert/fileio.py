"""Atomic writes: every output is written to a temporary file beside its target, then renamed, so a
crash or an error never leaves a half-written file under the final name.

The temporary file is ``.<target name>.<random>.tmp`` (hidden, another suffix): an error removes it, but
a process killed outright (SIGKILL, power loss) can leave one behind. Nothing that lists outputs matches
such a name (``round_<r>.pt``, ``head_round_<r>.pt``: rundir.round_files, task.head_files), so --resume
never picks one up; it is safe to delete."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; renames it onto ``target`` on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``open`` for writing whose result appears under ``target`` only once the block succeeds."""
    with atomic_path(target) as tmp, open(tmp, mode) as handle:
        yield handle


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_open(target) as handle:
        handle.write(text)


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def package_sha1() -> str:
    """SHA-1 of the fedhubert package's source: every .py file's path and bytes. A cache keyed on it is
    rebuilt after any code change (a fix to training or to the features changes what it would hold)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
