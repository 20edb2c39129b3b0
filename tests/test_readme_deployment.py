"""The README's deployment recipe ("On real machines: Flower's deployment engine"), run as written on
loopback: every ```bash block marked ``<!-- deployment-recipe: MACHINE -->``, in README order, on its
machine. A machine is a home folder of its own (``~/fedhubert`` links to this repository); every block runs
in a fresh ``bash`` after the README's "every shell" block, with ``set -e``. The only changes to a block's
text: the host name superlink.example.org becomes localhost, 0.0.0.0 127.0.0.1, the ports free ones, and
on client k ``partition-id=0`` becomes ``partition-id=k``. ``scp`` is a stand-in on the workstation's PATH
that copies between the machines' home folders, and each machine's ``~/experiment.yaml`` is a tiny
config with ``kmeans.codebook: federated`` (the README leaves that file to the reader).

Each client's ``~/audio`` holds two bundled speakers no other client has. After the workstation has moved
the public files, client 1's whole home folder is moved (its audio and client folder together) before its
SuperNode starts. The federated k-means (2 rounds) and one round of pretraining run with TLS and
SuperNode authentication; a SuperNode with an unregistered key is refused. Every daemon is stopped by
the README's shutdown blocks, by pid, and by the test when it fails."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BUNDLED, REPO, SUBSET, TINY
from deployment_helpers import BIN, free_port, start, wait_for_text

MARKER = re.compile(r"<!-- deployment-recipe: ([a-z ]+) -->\n([ \t]*)```bash\n(.*?)\n\2```", re.DOTALL)
MACHINE_ORDER = ["server", "client", "workstation", "server", "workstation", "client", "workstation", "workstation",
                 "server", "client"]
SPEAKERS = (("1688", "2033"), ("3005", "367"))  # client k's own speakers: no shared corpus
UTTERANCES = 4                                   # per speaker
HOST, RUN_TIMEOUT = "superlink.example.org", 420


def recipe() -> tuple[str, list[tuple[str, str]]]:
    """(the every-shell block, [(machine, block)] in README order), each block dedented to its fence."""
    section = (REPO / "README.md").read_text()
    section = section[section.index("### On real machines: Flower's deployment engine"):]
    section = section[:section.index("\n## ")]
    blocks = []
    for machine, indent, body in MARKER.findall(section):
        lines = [line[len(indent):] if line.startswith(indent) else line for line in body.split("\n")]
        blocks.append((machine, "\n".join(lines)))
    assert blocks and blocks[0][0] == "every shell", "the recipe starts with the block every shell runs"
    return blocks[0][1], blocks[1:]


class Machines:
    """One home folder per machine under ``root``; runs blocks there and keeps what is needed to stop them."""

    def __init__(self, root: Path, started: list[subprocess.Popen]) -> None:
        self.root, self.started = root, started
        self.homes = {name: root / name for name in ("server", "workstation", "client0", "client1")}
        self.link_port = free_port()
        self.node_ports = {"client0": free_port(), "client1": free_port()}
        shim = root / "shim"  # the workstation's scp: host:path -> that machine's home/path
        shim.mkdir()
        (shim / "scp").write_text(
            f"#!{sys.executable}\nimport shutil, sys\nhomes = {{}}\n"
            "for line in open(sys.argv[0] + '.hosts'):\n    host, home = line.rstrip('\\n').split(' ', 1)\n"
            "    homes[host] = home\n"
            "def where(arg):\n    host, sep, path = arg.partition(':')\n"
            "    return f'{homes[host]}/{path}' if sep else arg\n"
            "shutil.copyfile(where(sys.argv[-2]), where(sys.argv[-1]))\n")
        (shim / "scp").chmod(0o755)
        self.shim = shim

    def write_hosts(self) -> None:
        hosts = {"localhost": self.homes["server"], "client0.example.org": self.homes["client0"],
                 "client1.example.org": self.homes["client1"]}
        (self.shim / "scp.hosts").write_text("".join(f"{h} {home}\n" for h, home in hosts.items()))

    def text(self, machine: str, block: str) -> str:
        """The block as it runs on ``machine``: host names, the bind address and ports substituted."""
        # what is substituted must be there: a README with other ports would otherwise run on the real ones
        assert "flower-superlink" not in block or "--port 9093" in block, block
        assert "flower-supernode" not in block or ("--port 9094" in block and "partition-id=0" in block), block
        assert set(re.findall(rf"{re.escape(HOST)}:(\d+)", block)) <= {"9093"}, block
        text = block.replace(HOST, "localhost").replace("0.0.0.0", "127.0.0.1")
        text = text.replace("9093", str(self.link_port))
        if machine.startswith("client"):
            text = text.replace("9094", str(self.node_ports[machine]))
            text = text.replace("partition-id=0", f"partition-id={machine[-1]}")
        return text

    def env(self, machine: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
        env["HOME"] = str(self.homes[machine])
        if machine == "workstation":
            env["PATH"] = f"{self.shim}{os.pathsep}{env['PATH']}"
        return env

    def run(self, machine: str, every_shell: str, block: str, name: str) -> subprocess.Popen:
        """Starts the block on ``machine`` in a process group of its own (its background jobs stay in it)."""
        log = self.root / f"{name}.log"
        script = f"{every_shell}\nset -e\n{self.text(machine, block)}\n"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.homes[machine], env=self.env(machine),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def pids(self) -> list[int]:
        """The daemons' pids, from the pid files the README's blocks write."""
        found = []
        for home in self.homes.values():
            for pid_file in home.glob("*.pid"):
                text = pid_file.read_text().strip()
                if text.isdigit():
                    found.append(int(text))
        return found

    def stop(self) -> None:
        """SIGTERM to every daemon still running (by its pid file); the fixture then stops the groups."""
        for pid in self.pids():
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 15
        while any(alive(pid) for pid in self.pids()) and time.time() < deadline:
            time.sleep(0.3)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Waits for a foreground block; its output. A failure shows the output's end."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.log.name} still running after {timeout:g} s:\n{proc.log.read_text()[-4000:]}")
    output = proc.log.read_text()
    assert proc.returncode == 0, f"{proc.log.name} exited {proc.returncode}:\n{output[-4000:]}"
    return output


def wait_for_daemon(port: int, pid_file: Path, log: Path, timeout: float = 90) -> int:
    """Waits until the daemon whose pid the block wrote listens on ``port``; its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pid_file.exists() and pid_file.read_text().strip().isdigit():
            pid = int(pid_file.read_text())
            if not alive(pid):
                raise AssertionError(f"{pid_file.name}: process {pid} exited:\n{log.read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return pid
        time.sleep(0.3)
    raise AssertionError(f"port {port} did not open:\n{log.read_text()[-3000:] if log.exists() else 'no log'}")


def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout  # the stream can end a moment before the ServerApp's last write
    while not path.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert path.exists(), f"{path} not written"


def give_audio(home: Path, speakers: tuple[str, ...]) -> None:
    """``~/audio/<speaker>/<chapter>/*.flac``: a few of this client's own bundled speakers' utterances."""
    for speaker in speakers:
        for chapter in sorted((BUNDLED / SUBSET / speaker).iterdir()):
            target = home / "audio" / speaker / chapter.name
            target.mkdir(parents=True)
            for flac in sorted(chapter.glob("*.flac"))[:UTTERANCES]:
                shutil.copy(flac, target)


def experiment_config() -> str:
    """``~/experiment.yaml``: the tiny test model, one codebook for all clients, one round."""
    config: dict = {"extends": "fedhubert/configs/pretraining_config.yaml"}
    for item in [*TINY, "kmeans.codebook=federated", "kmeans.max_rounds=2", "federation.num_rounds=1"]:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    return yaml.safe_dump(config, sort_keys=False)


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="the recipe makes its certificates with openssl and its SuperNode keys with ssh-keygen")
def test_the_readme_deployment_recipe_as_written(tmp_path, processes):
    every_shell, blocks = recipe()
    assert [machine for machine, _ in blocks] == MACHINE_ORDER, "the README's recipe changed: change this test with it"
    m = Machines(tmp_path, processes)
    for name, home in m.homes.items():
        home.mkdir()
        (home / "fedhubert").symlink_to(REPO)
        if name != "workstation":
            (home / "experiment.yaml").write_text(experiment_config())
    for k, speakers in enumerate(SPEAKERS):
        give_audio(m.homes[f"client{k}"], speakers)
    clients = ("client0", "client1")
    steps = iter(blocks)

    def on(machine: str, name: str, timeout: float = 300) -> list[str]:
        """Runs the next block on ``machine`` (every client machine for "client", at once); their outputs."""
        where, block = next(steps)
        assert where == machine
        targets = clients if machine == "client" else (machine,)
        procs = [m.run(target, every_shell, block, f"{name}-{target}") for target in targets]
        return [finish(proc, timeout) for proc in procs]

    try:
        on("server", "1-certificates")
        on("client", "2-key-and-client-folder")
        m.write_hosts()
        on("workstation", "3-copies")
        for k in range(2):  # what went where: the CA to everyone, each client's public key to the workstation
            assert sha1(m.homes[f"client{k}"] / "fedhubert-certs" / "ca.crt") == sha1(m.homes["server"] / "fedhubert-certs" / "ca.crt")
            assert (m.homes["workstation"] / "fedhubert-certs" / f"client{k}.pub").read_text() == \
                (m.homes[f"client{k}"] / "fedhubert-certs" / "supernode.pub").read_text()
        assert not (m.homes["workstation"] / "fedhubert-certs" / "ca.key").exists()

        moved = tmp_path / "client1-moved"  # the client machine's audio and client folder move together
        m.homes["client1"].rename(moved)
        m.homes["client1"] = moved

        on("server", "4-superlink")
        link_pid = wait_for_daemon(m.link_port, m.homes["server"] / "superlink.pid", tmp_path / "4-superlink-server.log")
        on("workstation", "5-connection-and-registration", timeout=120)

        # A SuperNode whose key was never registered is refused (the same CA, the same SuperLink).
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "rogue")],
                       check=True, capture_output=True)
        rogue_log = tmp_path / "unregistered.log"
        rogue_env = dict(m.env("workstation"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # flower-superexec
        rogue = start(processes, rogue_env, rogue_log, "flower-supernode", "--superlink",
                      f"localhost:{m.link_port}", "--root-certificates",
                      str(m.homes["workstation"] / "fedhubert-certs" / "ca.crt"), "--auth-supernode-private-key",
                      str(tmp_path / "rogue"), "--port", str(free_port()), "--max-retries", "1")
        wait_for_text(rogue_log, "Failed to activate SuperNode", rogue, timeout=60)
        os.killpg(rogue.pid, signal.SIGTERM)

        on("client", "6-supernode")
        node_pids = [wait_for_daemon(m.node_ports[c], m.homes[c] / "supernode.pid", tmp_path / f"6-supernode-{c}.log")
                     for c in clients]
        for c in clients:  # kmeans.codebook: federated: prepare_client.py wrote the manifests only
            assert not (m.homes[c] / "fedhubert-client" / "train.km").exists()

        on("workstation", "7-kmeans", timeout=RUN_TIMEOUT)
        server_out = m.homes["server"] / "fedhubert-server"
        wait_for_file(server_out / "labels" / "targets.json")
        codebook = server_out / "labels" / "codebook.npy"
        for c in clients:  # each SuperNode labelled its own folder with the one codebook
            for split in ("train", "valid"):
                assert (m.homes[c] / "fedhubert-client" / f"{split}.km").is_file(), (c, split)

        on("workstation", "7-pretraining", timeout=RUN_TIMEOUT)
        server = server_out / "checkpoints" / "server"
        wait_for_file(server / "best_global_model_hf" / "config.json")
        state = torch.load(server / "round_1.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model_weight"].values())
        assert state["codebook_sha1"] == sha1(codebook)  # the head travelled, trained on that codebook
        assert (server / "best_global_model.pt").is_file()
        for c in clients:  # a federated head: no client keeps one, neither where the README says nor on the server
            assert not (m.homes[c] / "fedhubert-client" / "heads").exists()
        assert not (server_out / "checkpoints" / "clients").exists()

        on("server", "8-shutdown")
        on("client", "8-shutdown")
        deadline = time.time() + 30
        while any(alive(pid) for pid in (link_pid, *node_pids)) and time.time() < deadline:
            time.sleep(0.3)
        assert not any(alive(pid) for pid in (link_pid, *node_pids)), "a daemon outlived its kill"
        assert next(steps, None) is None
    finally:
        m.stop()
