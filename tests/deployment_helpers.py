"""Helpers of the deployment-engine tests (test_readme_deployment.py, test_supernode_killed.py): free loopback
ports, starting flower-superlink / flower-supernode / flwr in process groups of their own, waiting for a
port, and stopping every group that was started (the ``processes`` fixture in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"port {port} did not open:\n{log.read_text()[-3000:]}")


def wait_for_text(log: Path, text: str, proc: subprocess.Popen | None = None, timeout: float = 120,
                  after: int = 0) -> int:
    """Waits until ``text`` appears in ``log`` at or after character ``after``; returns where it starts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = log.read_text(errors="replace").find(text, after)
        if found >= 0:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log.name} after {timeout:g} s:\n{log.read_text()[-3000:]}")


def flwr_env(tmp_path: Path, link_port: int, certs: Path | None = None) -> dict[str, str]:
    """The environment of the Flower commands: FLWR_HOME under ``tmp_path`` whose config.toml names the
    SuperLink on ``link_port`` as ``loopback`` (TLS with ``certs``/ca.crt, else insecure)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        + (f'root-certificates = "{certs / "ca.crt"}"\n' if certs else "insecure = true\n"))
    return dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def start(started: list[subprocess.Popen], env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """Starts ``BIN/args[0]`` in a process group of its own (its children, e.g. flwr-clientapp, join it),
    output to ``log``; appended to ``started`` so that stop_all stops it."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
    started.append(proc)
    return proc


def stop_all(started: list[subprocess.Popen]) -> None:
    """SIGTERM to every group, SIGKILL to whatever is left 15 s later (and to the groups' children)."""
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:  # children (flwr-serverapp / flwr-clientapp / superexec) share the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
