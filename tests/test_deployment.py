"""Flower's deployment engine on loopback: one flower-superlink, two flower-supernodes (each with its
own partition id and data path), and `flwr run` of this repository's app for one round; once in insecure
mode and once with TLS (a private CA made with openssl) and SuperNode authentication (ssh-keygen keys
registered with `flwr supernode register`), as the README describes. The insecure run first makes one
codebook for both clients with the federated k-means (`task="kmeans"`, the same app pair) and then
pretrains with a federated head; the secure one keeps local codebooks. Every process started is stopped."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, copy_corpus, make_config
from deployment_helpers import BIN, flwr_env, free_port, start as start_process, wait_for_port
from fedhubert.partition import partition_corpus
from fedhubert.targets import generate_targets


def make_credentials(folder: Path) -> None:
    """A private CA, a server certificate for 127.0.0.1, and one SuperNode key pair per client."""
    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True)

    folder.mkdir()
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
        "-out", "ca.crt", "-subj", "/CN=fedhubert-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-out", "server.pem", "-extfile", "san.ext")
    for name in ("client_0_key", "client_1_key", "unregistered_key"):
        run("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", name)


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-and-supernode-auth"])
def test_two_supernodes_one_round_on_loopback(tmp_path, processes, secure):
    if secure and not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen are needed to make the TLS certificates and SuperNode keys")
    root = copy_corpus(tmp_path, speakers=["1688", "2033", "3005", "367"], utts_per_speaker=3)
    federated_codebook = not secure
    overrides = [*TINY, "partition.num_clients=2", "federation.num_rounds=1",
                 f"federation.checkpoint_dir={tmp_path / 'ckpt'}",
                 f"kmeans.codebook={'federated' if federated_codebook else 'local'}",
                 "kmeans.max_rounds=2"]  # every message starts a flwr-clientapp process: seconds each
    cfg = make_config(root, tmp_path / "partitions", *overrides)
    partition_corpus(cfg)
    if not federated_codebook:  # else the federation makes the targets, below
        generate_targets(cfg)

    link_port = free_port()
    certs = tmp_path / "certs"
    if secure:
        make_credentials(certs)
    env = flwr_env(tmp_path, link_port, certs if secure else None)
    link_security = (["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                      "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"] if secure
                     else ["--insecure"])

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        return start_process(processes, env, log, *args), log

    link, link_log = start("superlink", "flower-superlink", *link_security, "--host", "127.0.0.1",
                           "--port", str(link_port))
    wait_for_port(link_port, link, link_log)
    if secure:  # a SuperNode whose key was never registered is refused
        rogue, rogue_log = start("unregistered", "flower-supernode", "--superlink", f"127.0.0.1:{link_port}",
                                 "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key",
                                 str(certs / "unregistered_key"), "--port", str(free_port()), "--max-retries", "1")
        deadline = time.time() + 60
        while "Failed to activate SuperNode" not in rogue_log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        assert "Failed to activate SuperNode" in rogue_log.read_text(), rogue_log.read_text()[-3000:]
        os.killpg(rogue.pid, signal.SIGTERM)
    for k in range(2):
        node_security = ["--insecure"]
        if secure:  # the SuperLink accepts only registered SuperNode keys
            register = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs / f"client_{k}_key.pub"),
                                       "loopback"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert register.returncode == 0, register.stdout + register.stderr
            node_security = ["--root-certificates", str(certs / "ca.crt"),
                             "--auth-supernode-private-key", str(certs / f"client_{k}_key")]
        node_port = free_port()
        node, node_log = start(f"supernode{k}", "flower-supernode", *node_security, "--superlink",
                               f"127.0.0.1:{link_port}", "--port", str(node_port), "--node-config",
                               f'partition-id={k} num-partitions=2 data-path="{tmp_path / "partitions" / f"client_{k}"}"')
        wait_for_port(node_port, node, node_log)

    server_overrides = " ".join([*overrides, f"data.partitions_dir={tmp_path / 'partitions'}",
                                 f"data.librispeech_root={root}"])
    base_config = REPO / "configs" / "pretraining_config.yaml"
    run_config = f'config="{base_config}" overrides="{server_overrides}"'
    if federated_codebook:
        kmeans = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream", "--run-config",
                                 f'{run_config} task="kmeans"'], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert kmeans.returncode == 0, kmeans.stdout[-3000:] + kmeans.stderr[-3000:]
        deadline = time.time() + 60  # the stream can end a moment before the ServerApp's last write
        while not (tmp_path / "partitions" / "targets.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        for k in range(2):  # each SuperNode labelled its own folder with the one codebook
            assert (tmp_path / "partitions" / f"client_{k}" / "train.km").is_file()
        assert (tmp_path / "partitions" / "codebook.npy").is_file()
    run = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream", "--run-config", run_config],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    server = tmp_path / "ckpt" / "server"
    deadline = time.time() + 60  # the stream can end a moment before the ServerApp's last write
    while not (server / "best_global_model_hf" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (server / "round_1.pt").is_file(), run.stdout[-3000:]
    assert (server / "best_global_model.pt").is_file()
    weights = torch.load(server / "round_1.pt", weights_only=True)["model_weight"]
    assert all(torch.isfinite(t).all() for t in weights.values())
    if federated_codebook:  # the head travelled: the checkpoint carries it, and the codebook it was trained on
        state = torch.load(server / "round_1.pt", weights_only=True)
        assert state["codebook_sha1"] == hashlib.sha1((tmp_path / "partitions" / "codebook.npy").read_bytes()).hexdigest()
        assert not (tmp_path / "ckpt" / "clients" / "client_0" / "head_round_1.pt").exists()
    else:
        for k in range(2):
            assert (tmp_path / "ckpt" / "clients" / f"client_{k}" / "head_round_1.pt").is_file()
