"""kmeans.codebook=federated: with one codebook for all clients the prediction head means the same on
every client, so it is federated with the encoder (task.head_is_federated). A 2-round tiny federation
on targets from federated k-means: the head is in what the server aggregates, the global checkpoints
carry the trained head, every client gets it, no client head file is written; the guard against a
missing or unfitting codebook; distillation and the evaluation use the checkpoint's own head."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DISTILL_STUDENT, TINY, fed_config, make_config
from fedhubert.errors import DataError
from fedhubert.evaluate import check_s3prl_load
from fedhubert.federation.simulation import run_federated_pretraining
from fedhubert.federation.task import build_model, decode_arrays, is_head_param
from fedhubert.federation.tasks import DistillationTask, FederatedTask
from fedhubert.model import HEAD_PARAM_PREFIXES
from fedhubert.targets import generate_targets

FEDERATED = "kmeans.codebook=federated"
HEAD = ("final_proj.weight", "final_proj.bias", "label_embs_concat")


@pytest.fixture(scope="module")
def codebook_partitions(federated_partitions, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the shared tiny federation's partitions, relabelled by federated k-means (one codebook)."""
    root, shared = federated_partitions
    parts = tmp_path_factory.mktemp("fedhead") / "partitions"
    shutil.copytree(shared, parts)
    generate_targets(make_config(root, parts, *TINY, FEDERATED, "kmeans.max_rounds=2"))
    assert (parts / "codebook.npy").is_file()
    return root, parts


@pytest.fixture(scope="module")
def federated_head_run(codebook_partitions, tmp_path_factory):
    """(config, result, messages): a 2-round pretraining with kmeans.codebook=federated; ``messages`` holds
    (kind, round, partition or node, decoded arrays) of every message the server sent and received."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    messages: list[tuple[str, str, int, int, dict[str, torch.Tensor]]] = []
    send_and_receive = InMemoryGrid.send_and_receive

    def spy(self, outgoing, *args, **kwargs):
        outgoing = list(outgoing)
        for msg in outgoing:
            messages.append(("sent", msg.metadata.message_type, int(msg.content["config"]["server-round"]),
                             msg.metadata.dst_node_id, decode_arrays(msg.content["arrays"])))
        replies = list(send_and_receive(self, outgoing, *args, **kwargs))
        for reply in replies:
            if not reply.has_error() and "arrays" in reply.content:
                messages.append(("received", reply.metadata.message_type, -1,
                                 int(reply.content["metrics"]["partition-id"]), decode_arrays(reply.content["arrays"])))
        return replies

    cfg = fed_config(codebook_partitions, tmp_path_factory.mktemp("fedhead-run") / "ckpt", FEDERATED,
                     "federation.num_rounds=2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InMemoryGrid, "send_and_receive", spy)
        result = run_federated_pretraining(cfg)
    return cfg, result, messages


def test_the_head_is_aggregated_and_every_client_gets_the_global_one(federated_head_run):
    cfg, result, messages = federated_head_run
    out = Path(cfg.federation.checkpoint_dir)
    seeded = build_model(cfg).state_dict()
    round0 = torch.load(out / "server" / "round_0.pt", weights_only=True)["model_weight"]
    round2 = torch.load(out / "server" / "round_2.pt", weights_only=True)
    assert all(torch.equal(round0[n], seeded[n]) for n in HEAD)

    # what the clients sent back for aggregation holds the head, each client's own trained copy
    replies = [(pid, arrays) for way, kind, _, pid, arrays in messages if way == "received" and kind == "train"]
    assert len(replies) == 6 and all(set(HEAD) <= set(arrays) for _, arrays in replies)
    assert all(set(arrays) == set(seeded) for _, arrays in replies)  # the whole model travels
    assert not torch.equal(replies[0][1]["final_proj.weight"], seeded["final_proj.weight"])

    # the global checkpoint carries the trained, aggregated head, not the seeded one
    weights = round2["model_weight"]
    for name in HEAD:
        assert not torch.equal(weights[name], round0[name]), name
    assert round2["codebook_sha1"] == hashlib.sha1((Path(cfg.data.partitions_dir) / "codebook.npy").read_bytes()
                                                   ).hexdigest()

    # after the last round every client evaluates with exactly the global head (and encoder)
    last = [(node, arrays) for way, kind, rnd, node, arrays in messages if way == "sent" and kind == "evaluate"
            and rnd == 2]
    assert len({node for node, _ in last}) == 3
    for _, arrays in last:
        for name, tensor in weights.items():
            assert torch.equal(arrays[name], tensor), name

    # nothing stays on a client: no head files, the whole model on the wire
    assert not list(out.rglob("*head_round_*.pt"))
    record = result["history"][1]
    assert record["bytes_sent_per_client"] == sum(t.numel() * 4 for t in seeded.values())
    assert (out / "server" / "best_global_model_hf" / "config.json").is_file()
    assert check_s3prl_load(cfg) == cfg.model.num_hidden_layers + 1


def test_evaluation_scores_masked_prediction_with_the_checkpoints_own_head(federated_head_run):
    from fedhubert.eval_rows import _masked_with_heads

    cfg, _, _ = federated_head_run
    best = Path(cfg.federation.checkpoint_dir) / "server" / "best_global_model.pt"
    result = _masked_with_heads(best, cfg, FederatedTask())()  # no client head file exists to read
    assert [c["client"] for c in result["per_client"]] == ["client_0", "client_1", "client_2"]
    assert 0.0 <= result["masked_accuracy"] <= 1.0 and result["masked_loss"] > 0


def test_a_federated_teacher_distils_with_its_own_head(federated_head_run, tmp_path):
    cfg, _, _ = federated_head_run
    teacher = Path(cfg.federation.checkpoint_dir) / "server" / "best_global_model.pt"
    root, parts = Path(cfg.data.librispeech_root), Path(cfg.data.partitions_dir)
    distill = fed_config((root, parts), cfg.federation.checkpoint_dir, FEDERATED, *DISTILL_STUDENT,
                         f"distillation.teacher_model_path={teacher}",
                         f"distillation.checkpoint_dir={tmp_path / 'distill'}")
    task = DistillationTask()
    task.preflight(distill)  # no client head file is needed
    assert not task.is_local(distill, "student.final_proj.weight")  # the student's head is federated too
    global_head = {n: t for n, t in torch.load(teacher, weights_only=True)["model_weight"].items()
                   if n.startswith(HEAD_PARAM_PREFIXES)}
    for k in range(3):
        loss = task.client_loss(distill, k, {}, parts / f"client_{k}", torch.device("cpu"))
        used = {n: t for n, t in loss.teacher.state_dict().items() if n.startswith(HEAD_PARAM_PREFIXES)}
        assert used.keys() == global_head.keys()
        assert all(torch.equal(used[n], global_head[n]) for n in used), k

    # other labels than the teacher's codebook: refused before anything runs
    other = tmp_path / "partitions"
    shutil.copytree(parts, other)
    np.save(other / "codebook.npy", np.load(other / "codebook.npy") + 1.0)
    moved = fed_config((root, other), cfg.federation.checkpoint_dir, FEDERATED, *DISTILL_STUDENT,
                       f"distillation.teacher_model_path={teacher}",
                       f"distillation.checkpoint_dir={tmp_path / 'distill'}")
    with pytest.raises(DataError, match="is not the codebook the teacher"):
        task.preflight(moved)


def test_a_federated_head_needs_the_codebook(federated_partitions, codebook_partitions, tmp_path, caplog):
    # targets from per-client k-means: refused before the simulation starts, naming the file
    cfg = fed_config(federated_partitions, tmp_path / "ckpt", FEDERATED)
    with pytest.raises(DataError) as err:
        run_federated_pretraining(cfg)
    message = str(err.value)
    assert "\n" not in message and str(Path(federated_partitions[1]) / "codebook.npy") in message
    assert "not found" in message and not (tmp_path / "ckpt").exists()

    # a codebook of more clusters than the model's label space
    small = fed_config(codebook_partitions, tmp_path / "ckpt", FEDERATED, "kmeans.n_clusters=10",
                       "model.vocab_size=14")
    with pytest.raises(DataError, match=r"codebook.npy has 20 clusters but model.vocab_size is 14"):
        FederatedTask().preflight(small)

    # a client whose labels still come from its own k-means (the federated labelling never reached it)
    parts = tmp_path / "partitions"
    shutil.copytree(codebook_partitions[1], parts)
    (parts / "client_1" / "kmeans.joblib").write_bytes(b"")
    with pytest.raises(DataError, match=r"client_1/kmeans.joblib: client 1's labels come from its own k-means"):
        FederatedTask().preflight(fed_config((codebook_partitions[0], parts), tmp_path / "ckpt", FEDERATED))

    # kmeans.codebook=local on shared labels: allowed, the heads stay local, and it says so
    local = fed_config(codebook_partitions, tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING):
        FederatedTask().preflight(local)
    assert "kmeans.codebook is local" in caplog.text
    assert FederatedTask().is_local(local, "final_proj.weight") and not FederatedTask().is_local(cfg, "final_proj.weight")
    assert not FederatedTask().is_local(local, "encoder.layers.0.fc1.weight") and is_head_param("label_embs_concat")
