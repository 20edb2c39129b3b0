#!/usr/bin/env python
"""The lock of the verified stack: every package requirements.txt pulls in, at the version installed
in the running interpreter's environment, as pip constraints (requirements.lock). The setup step
installs with ``pip install -r requirements.txt -c requirements.lock``, so every machine gets the same
versions months apart; a test checks that the environment still matches the lock.

    .venv/bin/python scripts/lock_requirements.py            # rewrite requirements.lock from .venv
    .venv/bin/python scripts/lock_requirements.py --check    # list each difference; exit 1 if any

The lock holds the requirements' dependency closure, resolved against what is installed (markers and
extras evaluated here), not a bare ``pip freeze``: a tool installed by hand (a linter) stays out of it,
so that a clean install from the lock matches the lock exactly."""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"
LOCK = ROOT / "requirements.lock"
PLATFORM_KEY = "# platform:"


def platform_tag() -> str:
    """Where a closure was resolved: markers (nvidia wheels only on Linux x86_64, backports on old
    Pythons) make the closure differ elsewhere."""
    return f"{sys.platform}-{platform.machine()} python{sys.version_info.major}.{sys.version_info.minor}"


def read_requirements(path: Path) -> list[Requirement]:
    """requirements.txt's requirement lines (comments, blanks and pip options skipped)."""
    reqs = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            reqs.append(Requirement(line))
        except ValueError as exc:
            raise SystemExit(f"{path}:{number}: not a requirement: {line!r} ({exc})") from None
    return reqs


class Installed(NamedTuple):
    name: str  # as the package spells it
    version: str
    requires: list[str]  # its Requires-Dist lines


def installed() -> dict[str, Installed]:
    """The running interpreter's distributions by canonical name (the first on sys.path wins, as imports
    do), each metadata file parsed once (importlib.metadata re-parses it on every attribute)."""
    dists: dict[str, Installed] = {}
    for dist in metadata.distributions():
        meta = dist.metadata
        if meta["Name"]:
            dists.setdefault(canonicalize_name(meta["Name"]),
                             Installed(meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or []))
    return dists


def closure(reqs: list[Requirement], dists: dict[str, Installed]) -> tuple[dict[str, str], list[str]]:
    """({canonical name: installed version} of every package ``reqs`` pull in here, [problems]):
    a required package that is not installed, or whose version its requirement excludes, is a problem."""
    env = default_environment()
    found: dict[str, str] = {}
    problems: list[str] = []
    queue: list[tuple[Requirement, str]] = [(r, "requirements.txt") for r in reqs]
    seen_extras: set[tuple[str, str]] = set()
    while queue:
        req, wanted_by = queue.pop()
        name = canonicalize_name(req.name)
        dist = dists.get(name)
        if dist is None:
            problems.append(f"{req.name}: required by {wanted_by} but not installed")
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req.name}: {dist.version} installed, {wanted_by} wants {req.specifier}")
        found[name] = dist.version
        for extra in ["", *sorted(canonicalize_name(e) for e in req.extras)]:
            if (name, extra) in seen_extras:
                continue
            seen_extras.add((name, extra))
            for line in dist.requires:
                dep = Requirement(line)
                if dep.marker is None or dep.marker.evaluate({**env, "extra": extra}):
                    queue.append((dep, f"{dist.name}{f'[{extra}]' if extra else ''}"))
    return found, problems


def render(pins: dict[str, str]) -> str:
    """The lock file's text: a header saying how it was made, then one ``name==version`` a line."""
    header = [
        "# The verified stack: every package requirements.txt pulls in, at the version the tests pass with,",
        "# as pip constraints. scripts/setup_env.sh installs with `pip install -r requirements.txt -c requirements.lock`.",
        "# Regenerate (after changing requirements.txt and re-running the tests) with:",
        "#     .venv/bin/python scripts/lock_requirements.py",
        "# torch's pin is the default PyPI wheel (CUDA 13 runtime wheels included on Linux x86_64): the same",
        "# pins serve CPU-only and GPU machines.",
        f"{PLATFORM_KEY} {platform_tag()}",
    ]
    return "\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def read_lock(path: Path) -> tuple[dict[str, str], str]:
    """({canonical name: version}, platform tag) of a lock file; a malformed line stops with its number."""
    pins: dict[str, str] = {}
    tag = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith(PLATFORM_KEY):
            tag = line[len(PLATFORM_KEY):].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise SystemExit(f"{path}:{number}: not a 'name==version' pin: {line!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins, tag


def differences(lock: Path = LOCK, requirements: Path = REQUIREMENTS) -> list[str]:
    """One line per way the running environment differs from the lock: a package the requirements pull
    in that is unlocked or at another version, or (on the lock's own platform) a locked package no
    longer pulled in. Empty when they match."""
    if not lock.is_file():
        return [f"{lock}: missing (run: .venv/bin/python scripts/lock_requirements.py)"]
    pins, tag = read_lock(lock)
    found, problems = closure(read_requirements(requirements), installed())
    lines = list(problems)
    for name in sorted(found):
        if name not in pins:
            lines.append(f"{name}: {found[name]} installed but not in {lock.name}")
        elif pins[name] != found[name]:
            lines.append(f"{name}: {found[name]} installed, {lock.name} pins {pins[name]}")
    if tag == platform_tag():  # elsewhere markers may drop locked packages (nvidia wheels off Linux)
        lines += [f"{name}: pinned in {lock.name} but nothing in requirements.txt pulls it in"
                  for name in sorted(set(pins) - set(found))]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the environment with the lock; exit 1 on any difference")
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    args = parser.parse_args()
    if args.check:
        lines = differences(args.lock, args.requirements)
        print("\n".join(lines) if lines else f"{sys.prefix} matches {args.lock}")
        sys.exit(1 if lines else 0)
    found, problems = closure(read_requirements(args.requirements), installed())
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"not written: {sys.prefix} does not satisfy {args.requirements}", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(ROOT))
    from fedhubert.fileio import atomic_write_text  # temp file then rename: never a half-written lock

    atomic_write_text(args.lock, render(found))
    print(f"wrote {args.lock}: {len(found)} packages from {sys.prefix}")


if __name__ == "__main__":
    main()
