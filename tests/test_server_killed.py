"""The server process killed with SIGKILL in the middle of a round (issue 11): ``--resume`` continues
from the last complete round and ends with the same weights, bit for bit, as an uninterrupted run.

The uninterrupted run is the session's ``tiny_pretraining`` (2 rounds, FedAdam, 3 clients): the first
test runs the same config as ``federated_hubert_pretraining.py`` in its own process group, kills the
whole group (server, Ray and its workers) once a client has finished its round-2 training, and resumes.
The others, on a fake Grid, cover what a kill can fall between: a client's head and the server's
round checkpoint, the round checkpoint and the best model, and the node ids a new run draws."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from conftest import REPO, TINY, fed_config
from fake_grid import FakeGrid
from fedhubert.federation.rundir import check_resume, round_files
from fedhubert.federation.sampling import PARTITION_QUERY
from fedhubert.federation.simulation import FLOWER_ENV
from fedhubert.federation.task import absolutize_paths, decode_arrays, encode_arrays
from fedhubert.federation.tasks import get_task


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc), Ray's daemons and workers included."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (a zombie has ended: only its parent has not read it)."""
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def script(cfg, log: Path, *flags: str) -> subprocess.Popen:
    """federated_hubert_pretraining.py with ``cfg``'s data and checkpoint folders and the tiny model, in
    a session of its own so that one killpg reaches every process it starts."""
    sets = [f"data.librispeech_root={cfg.data.librispeech_root}", f"data.partitions_dir={cfg.data.partitions_dir}",
            *TINY, f"federation.checkpoint_dir={cfg.federation.checkpoint_dir}", "federation.num_rounds=2"]
    args = [sys.executable, "federated_hubert_pretraining.py", *flags, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, **FLOWER_ENV, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# On CPU the tiny model's kernels are deterministic: the runs agree bit for bit. On CUDA some backward
# kernels add atomically, in no fixed order: there they agree to float32 rounding.
EXACT = not torch.cuda.is_available()
TOLERANCE = {"rel": 0, "abs": 0} if EXACT else {"rel": 1e-4, "abs": 1e-6}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) if EXACT else torch.allclose(a, b, rtol=TOLERANCE["rel"], atol=TOLERANCE["abs"])


MEASURED = ("train_time_s", "samples_per_second", "audio_seconds_per_second", "peak_memory_mb")


def learned(train: dict) -> dict:
    """A round's training figures without what the machine measured (train.train_local's clocks, memory)."""
    return {k: v for k, v in train.items() if k not in MEASURED}


def watch(proc: subprocess.Popen, until, log: Path, timeout: float = 300) -> set[int]:
    """Waits for ``until()``, collecting the processes ``proc`` starts; kills its group on a timeout, or
    when it ends before ``until()`` (it should not have)."""
    seen, deadline = set(), time.monotonic() + timeout
    try:
        while not until():
            if proc.poll() is not None and not until():
                raise AssertionError(f"the run ended (exit {proc.returncode}): {log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"timed out; {log.read_text()[-3000:]}"
            seen |= descendants(proc.pid)
            time.sleep(0.1)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise
    return seen


def assert_ended(pids: set[int]) -> None:
    """No process of ``pids`` is left (Ray's daemons die with their parent, not always in the same instant)."""
    deadline = time.monotonic() + 30
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pids), f"left behind: {sorted(alive(pids))}"


def history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_server_killed_mid_round_resumes_to_the_uninterrupted_weights(federated_partitions, tiny_pretraining,
                                                                        tmp_path):
    straight_cfg, _ = tiny_pretraining
    straight = Path(straight_cfg.federation.checkpoint_dir)
    folder = tmp_path / "killed"
    cfg = fed_config(federated_partitions, folder, "federation.num_rounds=2")
    server = folder / "server"

    # 1. Run, and kill the whole process group once round 2's training has reached a client's disk.
    proc = script(cfg, tmp_path / "killed.log")
    ours = watch(proc, lambda: bool(list(folder.glob("clients/client_*/head_round_2.pt"))), tmp_path / "killed.log")
    assert ours, "no process of the run (Ray's daemons, its workers) was seen"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert_ended(ours)

    # 2. Killed in round 2: round 1 is the last complete round, and nothing half-written is ever listed.
    assert [rnd for rnd, _ in round_files(server)] == [0, 1], sorted(p.name for p in server.iterdir())
    assert check_resume(absolutize_paths(cfg), get_task("pretraining"), {}) == (1, server / "round_1.pt")
    torch.load(server / "round_1.pt", weights_only=True)
    assert [r["round"] for r in history(folder)] == [0, 1]

    # 3. --resume runs round 2 again, to the end.
    resumed = script(cfg, tmp_path / "resumed.log", "--resume")
    ours = watch(resumed, lambda: resumed.poll() is not None, tmp_path / "resumed.log")
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert_ended(ours)
    assert "resuming from" in (tmp_path / "resumed.log").read_text()

    # 4. The same weights, server optimizer state and metrics as the run that was never killed (bit for bit on CPU).
    for name in ("round_2.pt", "best_global_model.pt"):
        a = torch.load(server / name, weights_only=True)
        b = torch.load(straight / "server" / name, weights_only=True)
        assert a["round"] == b["round"] and a["model_weight"].keys() == b["model_weight"].keys(), name
        for key, tensor in b["model_weight"].items():
            assert same(a["model_weight"][key], tensor), f"{name}: {key}"
    a = torch.load(server / "round_2.pt", weights_only=True)["strategy_state"]
    b = torch.load(straight / "server" / "round_2.pt", weights_only=True)["strategy_state"]
    assert set(b) >= {"m_t", "v_t"} and a.keys() == b.keys()  # FedAdam: its moments came back from round_1.pt
    for moment in b:
        assert a[moment].keys() == b[moment].keys() and all(same(a[moment][k], b[moment][k]) for k in b[moment])
    for k in range(3):  # every client's head: the local weights that never reach the server
        heads = [torch.load(f / "clients" / f"client_{k}" / "head_round_2.pt", weights_only=True)["head"]
                 for f in (folder, straight)]
        assert all(same(heads[0][n], heads[1][n]) for n in heads[1])
    mine, theirs = history(folder), history(straight)
    assert [r["round"] for r in mine] == [0, 1, 2]  # each round once
    for rec, ref in zip(mine, theirs):  # every figure but the clocks and the memory, which no run repeats
        assert learned(rec["train"]) == pytest.approx(learned(ref["train"]), **TOLERANCE), rec["round"]
        assert rec["val"] == pytest.approx(ref["val"], **TOLERANCE), rec["round"]


# --- the writes a kill can fall between --------------------------------------------------------------------

def test_a_client_keeps_the_head_that_a_resume_of_the_round_before_needs(tmp_path):
    # A client writes head_round_<r>.pt before the server writes round_<r>.pt: a server killed in between
    # resumes at round r, whose training starts from the client's head of round r - 1, even with keep 1.
    from fedhubert.federation.client_app import HeadStore

    store = HeadStore(tmp_path, keep=1, prefix="head")
    for rnd in (1, 2, 3):
        store.save(rnd, {"final_proj.weight": torch.full((2, 2), float(rnd))}, keep_round=-1, targets_sha1="x")
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"head_round_{r}.pt" for r in (rnd - 1, rnd) if r]
    resumed = HeadStore(tmp_path, keep=1, prefix="head")  # a new client process
    assert float(resumed.latest(up_to=2)["final_proj.weight"][0, 0]) == 2.0


class Killed(BaseException):
    """SIGKILL between two writes: nothing after it runs (no except clause catches it)."""


def test_a_kill_between_the_round_checkpoint_and_the_best_model_is_repaired_by_resume(tmp_path, monkeypatch):
    from fedhubert.federation.tasks import FederatedTask
    from fake_grid import run, server_cfg

    real_save = FederatedTask.save

    def save(self, path, model, cfg, **extras):  # noqa: ANN001 - FederatedTask.save's
        if path.name == "best_global_model.pt" and extras["round"] == 2:
            raise Killed
        real_save(self, path, model, cfg, **extras)

    monkeypatch.setattr(FederatedTask, "save", save)
    with pytest.raises(Killed):
        run(server_cfg(tmp_path, "federation.num_rounds=2"))
    monkeypatch.undo()
    server = tmp_path / "ckpt" / "server"
    assert [rnd for rnd, _ in round_files(server)] == [0, 1, 2]
    assert torch.load(server / "best_global_model.pt", weights_only=True)["round"] == 1  # one round behind

    result = run(server_cfg(tmp_path, "federation.num_rounds=2"), resume=True)
    assert result["best_round"] == 2
    best = torch.load(server / "best_global_model.pt", weights_only=True)
    assert (best["round"], best["val_loss"]) == (2, result["best_val_loss"]) and \
        best["val_loss"] == result["history"][2]["val"]["loss"]
    final = torch.load(server / "round_2.pt", weights_only=True)["model_weight"]  # what the run saved as round 2
    assert best["model_weight"].keys() == final.keys()
    assert all(torch.equal(best["model_weight"][k], t) for k, t in final.items())


class Nodes:
    """The ClientApp's replies without training on a FakeGrid whose node ids are new in every run, as the
    simulation's are (os.urandom): ``ids[k]`` holds partition k, which moves every weight it receives by
    0.001 (k + 1), reports a validation loss that falls with the round, and says its partition when asked.
    The grid lists the nodes by id, not by partition."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.grid = ids, FakeGrid(sorted(ids), self)

    def __call__(self, msg: Message) -> Message:
        pid = self.ids.index(msg.metadata.dst_node_id)
        if msg.metadata.message_type == PARTITION_QUERY:
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
        rnd = int(msg.content["config"]["server-round"])
        metrics = {"num-examples": 10, "partition-id": pid, "loss": 10.0 - rnd + 0.1 * pid}
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if msg.metadata.message_type == "train":
            moved = {k: v + 0.001 * (pid + 1) for k, v in decode_arrays(msg.content["arrays"]).items()}
            content["arrays"] = encode_arrays(moved, "float32")
        return Message(content, reply_to=msg)


def test_a_resumed_run_samples_the_partitions_the_interrupted_one_would_have(tmp_path):
    # 2 of 4 clients per round: Flower's seeded draw picks positions in the grid's node list, and node ids
    # are new in every run; the server orders the nodes by partition (sampling.PartitionOrder).
    from fedhubert.federation.server_app import run_server
    from fake_grid import server_cfg

    sample = ("partition.num_clients=4", "federation.fraction_fit=0.5", "federation.fraction_evaluate=0.5",
              "federation.strategy=fedadam")
    (tmp_path / "straight").mkdir()
    straight = run_server(Nodes([21, 22, 23, 24]).grid, server_cfg(tmp_path / "straight", *sample,
                                                                      "federation.num_rounds=3"))
    run_server(Nodes([31, 32, 33, 34]).grid, server_cfg(tmp_path, *sample, "federation.num_rounds=2"))
    resumed = run_server(Nodes([94, 13, 58, 7]).grid, server_cfg(tmp_path, *sample, "federation.num_rounds=3"),
                         resume=True)

    def trained(history: list[dict]) -> list[list[str]]:
        return [sorted(r["client_train"]) for r in history[1:]]

    assert trained(resumed["history"]) == trained(straight["history"])
    assert all(len(r["client_train"]) == 2 and len(r["client_val"]) == 2 for r in straight["history"][1:])
    a = torch.load(tmp_path / "ckpt" / "server" / "round_3.pt", weights_only=True)["model_weight"]
    b = torch.load(tmp_path / "straight" / "ckpt" / "server" / "round_3.pt", weights_only=True)["model_weight"]
    assert all(torch.equal(a[k], t) for k, t in b.items())


def test_the_federated_kmeans_samples_the_same_partitions_whatever_the_node_ids(tmp_path):
    """2 of 3 clients per k-means round: two runs whose nodes have other ids (and so another order in
    Flower's node list) train the same partitions in every round and end with the same codebook."""
    from fake_grid import read_jsonl, run_kmeans

    def partitions_per_round(out: Path, nodes: list[int]) -> tuple[list[list[str]], np.ndarray]:
        run_kmeans(out, None, "federation.fraction_fit=0.67", "federation.min_fit_clients=2", "kmeans.max_rounds=4",
                   nodes=nodes)
        rounds = [sorted(r["bytes_up_per_client"]) for r in read_jsonl(out / "kmeans_metrics.jsonl")[1:]]
        return rounds, np.load(out / "codebook.npy")

    first, codebook = partitions_per_round(tmp_path / "a", [31, 32, 33])
    second, same = partitions_per_round(tmp_path / "b", [93, 12, 57])
    assert all(len(r) == 2 for r in first) and len({tuple(r) for r in first}) > 1  # a sample, not always the same
    assert second == first
    np.testing.assert_array_equal(same, codebook)
