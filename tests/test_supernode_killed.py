"""A SuperNode killed in the middle of a round (issue 11, faults), on Flower's deployment engine on
loopback: one flower-superlink, three flower-supernodes, `flwr run` of a 2-round pretraining with
federation.min_fit_clients=2. Partition 2's SuperNode gets SIGKILL (its whole process group, the
ClientApp it started included, as when its machine dies) while it trains in round 1, and is started
again at once with the same node config.

Flower 1.42 has no way to tell that a node died other than its heartbeats stopping: the SuperNode
reports one every ~20 s (HEARTBEAT_DEFAULT_INTERVAL 30 s, not a command-line option) and the SuperLink
marks it offline 2 x 30 s after the last one. Only then does it answer the in-flight message with a
NODE_UNAVAILABLE error in the node's stead (sent by the SuperLink, naming the node only through
reply_to_message_id), so round 1 waits 40-60 s for it; federation.round_timeout is set far above that,
so that the failure is always this error and a slow healthy node is never timed out on this shared
machine. The restarted SuperNode registers as a new node (insecure mode: a new key, so a new node id;
an authenticated one would get its old id back). Evaluation is off (federation.fraction_evaluate=0):
every message starts a ClientApp process, and the fault is in training.

Two in-process tests check the same error replies against the strategy and the federated k-means."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from conftest import REPO, TINY, copy_corpus, fed_config, make_config
from deployment_helpers import flwr_env, free_port, start, wait_for_port, wait_for_text
from fake_grid import FakeGrid
from fedhubert.federation.strategy import make_strategy
from fedhubert.federation.task import decode_arrays, encode_arrays
from fedhubert.partition import partition_corpus
from fedhubert.targets import generate_targets

ROUND_TIMEOUT = 600  # far above the SuperLink's 60 s heartbeat expiry: see the module docstring
UNAVAILABLE = "Node Unavailable"


@pytest.mark.parametrize("kind, reason", [("node_unavail", UNAVAILABLE), ("msg_unavail", "Reply Message Unavailable")])
def test_an_error_flower_sends_in_a_nodes_stead_is_that_nodes_failure(kind, reason):
    """The SuperLink's error reply for a dead node (or an expired reply) comes from the SuperLink's node id,
    not the node's: it must count as that node's failure with Flower's reason, not be ignored as a reply from
    an unsampled node while the node is reported as a timeout it never had."""
    cfg = fed_config(("/x", "/y"), "/z", "federation.min_fit_clients=2", "federation.strategy=fedavg")
    strategy = make_strategy(cfg)
    weights = {"w": np.ones((3, 2), np.float32)}
    grid = FakeGrid([11, 12, 13])
    messages = strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in weights.items()}), ConfigRecord(), grid)
    grid.push_messages(messages)  # gives each message its id, as send_and_receive does
    by_node = {m.metadata.dst_node_id: m for m in messages}

    def honest(node: int, pid: int) -> Message:
        trained = {k: v + pid for k, v in decode_arrays(by_node[node].content["arrays"]).items()}
        metrics = MetricRecord({"loss": 1.0, "num-examples": 4, "partition-id": pid})
        return Message(RecordDict({"arrays": encode_arrays(trained, "float32"), "metrics": metrics}),
                       reply_to=by_node[node])

    stand_in = create_message_error_unavailable_res_message(by_node[13].metadata, kind)  # Flower's own
    arrays, _ = strategy.aggregate_train(1, [honest(11, 0), stand_in, honest(12, 1)])
    report = strategy.train_report
    assert arrays is not None and report.succeeded == [0, 1] and report.nodes == {0: 11, 1: 12}
    assert report.ignored == []
    assert len(report.failed) == 1 and report.failed[0][0] == "node 13", report.failed
    assert report.failed[0][1].startswith("no reply: ") and reason in report.failed[0][1], report.failed
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)  # the two replies' mean: nothing of the error


def test_the_federated_kmeans_counts_a_dead_nodes_error_once_and_as_its_own():
    """The k-means exchange (kmeans_app._exchange) with the same error for node 13: one failure for node 13
    with Flower's reason, not a 'client raised' from node 1 (the SuperLink) plus a timeout for node 13."""
    from fedhubert.federation.kmeans_app import _exchange
    from fedhubert.federation.replies import Sent

    def answer(msg: Message) -> Message:
        if msg.metadata.dst_node_id == 13:
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        pid = msg.metadata.dst_node_id - 11
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    cfg = fed_config(("/x", "/y"), "/z")
    sent = Sent(1, "train.kmeans_stats", [11, 12, 13], weight=None)  # replies of metrics only
    good, report = _exchange(FakeGrid([11, 12, 13], answer), cfg, sent, None, lambda msg: "parsed", 2, "statistics")
    assert good == {0: "parsed", 1: "parsed"} and report.succeeded == [0, 1]
    assert len(report.failed) == 1 and report.failed[0][0] == "node 13", report.failed
    assert report.failed[0][1].startswith("no reply: ") and UNAVAILABLE in report.failed[0][1]


def metrics_of(path: Path) -> dict[int, dict]:
    return {r["round"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def test_a_supernode_killed_mid_round_fails_that_round_alone_and_rejoins(tmp_path, processes):
    root = copy_corpus(tmp_path, speakers=["1688", "2033", "3005", "367"], utts_per_speaker=3)
    overrides = [*TINY, "partition.num_clients=3", "federation.num_rounds=2", "federation.min_fit_clients=2",
                 "federation.min_available_clients=2", f"federation.round_timeout={ROUND_TIMEOUT}",
                 "federation.fraction_evaluate=0.0",  # no evaluation step: every message starts a ClientApp process
                 "training.max_local_steps=1", f"federation.checkpoint_dir={tmp_path / 'ckpt'}"]

    link_port = free_port()
    env = flwr_env(tmp_path, link_port)
    link_log = tmp_path / "superlink.log"
    link = start(processes, env, link_log, "flower-superlink", "--insecure", "--host", "127.0.0.1",
                 "--port", str(link_port))
    wait_for_port(link_port, link, link_log)

    def supernode(k: int, name: str) -> tuple[subprocess.Popen, Path, int]:
        """Starts partition k's SuperNode: (process, log, port)."""
        log, port = tmp_path / f"{name}.log", free_port()
        proc = start(processes, env, log, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                     "--port", str(port), "--node-config",
                     f'partition-id={k} num-partitions=3 data-path="{tmp_path / "partitions" / f"client_{k}"}"')
        return proc, log, port

    def node_id(proc: subprocess.Popen, log: Path, port: int) -> int:
        """Waits until the SuperNode is up and registered; its node id."""
        wait_for_port(port, proc, log)
        at = wait_for_text(log, "SuperNode ID: ", proc)
        return int(log.read_text()[at:].split("SuperNode ID: ")[1].split()[0])

    started = [supernode(k, f"supernode{k}") for k in range(3)]  # all three start at once
    cfg = make_config(root, tmp_path / "partitions", *overrides)  # while the SuperNodes start
    partition_corpus(cfg)
    generate_targets(cfg)
    nodes = [(proc, log, node_id(proc, log, port)) for proc, log, port in started]
    server_overrides = " ".join([*overrides, f"data.partitions_dir={tmp_path / 'partitions'}",
                                 f"data.librispeech_root={root}"])
    run_config = f'config="{REPO / "configs" / "pretraining_config.yaml"}" overrides="{server_overrides}"'
    run_log = tmp_path / "flwr-run.log"
    run = start(processes, env, run_log, "flwr", "run", str(REPO), "loopback", "--stream", "--run-config", run_config)

    # Round 1's train message reached partition 2's SuperNode and its ClientApp is starting: kill it.
    victim, victim_log, victim_id = nodes[2]
    received = wait_for_text(victim_log, "Receiving: train message", victim, timeout=400)
    wait_for_text(victim_log, "Start `flwr-clientapp` process", victim, after=received)
    os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and the ClientApp it started
    victim.wait()
    killed_at = time.time()
    assert "Sending: train message" not in victim_log.read_text()[received:]  # it died before replying
    new_id = node_id(*supernode(2, "supernode2-restarted"))
    assert new_id != victim_id

    assert run.wait(timeout=900) == 0, run_log.read_text()[-4000:]
    deadline = time.time() + 60  # the stream can end a moment before the ServerApp's last write
    while 2 not in metrics_of(tmp_path / "ckpt" / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.5)
    history = metrics_of(tmp_path / "ckpt" / "metrics.jsonl")
    first, second = history[1], history[2]
    # Round 1 went on with the two others (min_fit_clients 2), the killed node's failure recorded as Flower's
    # NODE_UNAVAILABLE error for its node id, about a minute after the kill rather than at the round timeout.
    assert first["clients_sampled"] == 3 and first["partitions_succeeded"] == [0, 1], first
    assert first["node_of_partition"] == {"0": nodes[0][2], "1": nodes[1][2]}
    assert len(first["failures"]) == 1 and first["failures"][0].startswith(f"node {victim_id}: no reply: "), first
    assert UNAVAILABLE in first["failures"][0] and first["ignored"] == []
    assert first["round_time_s"] < ROUND_TIMEOUT / 2
    # Round 2: the restarted SuperNode (a new node id, the same partition) trained again.
    assert second["partitions_succeeded"] == [0, 1, 2] and second["failures"] == [], second
    assert second["node_of_partition"]["2"] == new_id
    # each SuperNode kept its heads in its own data folder (no checkpoint-path given), not in the server's folder
    assert (tmp_path / "partitions" / "client_0" / "heads" / "head_round_2.pt").is_file()
    assert not (tmp_path / "ckpt" / "clients").exists()
    state = torch.load(tmp_path / "ckpt" / "server" / "round_2.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model_weight"].values())
    print(f"round 1 took {first['round_time_s']:.0f} s, round 2 {second['round_time_s']:.0f} s; "
          f"the run ended {time.time() - killed_at:.0f} s after the kill")
