"""The evaluation: held-out speech, the centralized baseline at equal compute, masked prediction with
each client's own head, and evaluate.py writing every row on the tiny federation's outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, fed_config
from fedhubert.centralized import federated_budget
from fedhubert.data import make_loader
from fedhubert.errors import DataError
from fedhubert.eval_rows import ROWS, masked_prediction
from fedhubert.eval_sets import segments, speaker_set
from fedhubert.federation.task import build_model, split_state
from fedhubert.train import train_local

SMALL_KEYWORDS = ["evaluation.keywords=[left,right,stop,go]", "evaluation.keyword_voices=6",
                  "evaluation.keyword_test_voices=2", "evaluation.keyword_rates=[160]"]


def test_heldout_utterances_are_in_no_client(federated_partitions, tiny_pretraining):
    cfg, _ = tiny_pretraining
    parts = Path(cfg.data.partitions_dir)
    heldout = {line.split("\t")[0] for line in (parts / "heldout.tsv").read_text().splitlines()[1:]}
    assert len(heldout) == 2 * 6
    for k in range(3):
        for split in ("train", "valid"):
            assert not heldout & {l.split("\t")[0] for l in (parts / f"client_{k}" / f"{split}.tsv").read_text().splitlines()[1:]}
    clips = speaker_set(cfg)
    assert len(set(clips.labels)) == 6 and any(clips.is_test) and not all(clips.is_test)
    for speaker in set(clips.labels):  # each speaker's train and test segments come from different utterances
        train = {g for g, lab, t in zip(clips.groups, clips.labels, clips.is_test) if lab == speaker and not t}
        test = {g for g, lab, t in zip(clips.groups, clips.labels, clips.is_test) if lab == speaker and t}
        assert train and test and not train & test


def test_segments_cover_the_utterance():
    wav = torch.arange(10_000, dtype=torch.float32)
    parts = segments(wav, 3000)
    assert [len(p) for p in parts] == [3000, 3000, 3000]  # the 1000-sample rest is under half a segment
    assert [len(p) for p in segments(wav, 4000)] == [4000, 4000, 2000]
    assert [len(p) for p in segments(wav[:500], 4000)] == [500]


def test_a_client_scores_with_its_own_head_not_anothers(federated_partitions, tmp_path):
    cfg = fed_config(federated_partitions, tmp_path, "training.max_local_steps=60", "training.local_epochs=200",
                     "training.learning_rate=5e-3", "model.hidden_dropout=0.0", "model.feat_proj_dropout=0.0",
                     "data.max_audio_length=48000")
    parts = Path(cfg.data.partitions_dir)
    model = build_model(cfg)
    loader = make_loader(parts / "client_0", "train", cfg, batch_size=4, seed=0, train=True)
    train_local(model, loader, cfg, "cpu", seed=0)
    _, own_head = split_state(model)
    # another client's head: its ids name other clusters. Same weights, label embeddings of other ids.
    perm = torch.randperm(cfg.model.vocab_size, generator=torch.Generator().manual_seed(0))
    other_head = {**own_head, "label_embs_concat": own_head["label_embs_concat"][perm]}
    # scored on client 0's training split: where this small model has surely learned something
    own = masked_prediction(model, cfg, [(parts / "client_0", own_head)], split="train")
    other = masked_prediction(model, cfg, [(parts / "client_0", other_head)], split="train")
    assert own["masked_accuracy"] > own["chance"] + 0.03, own
    assert other["masked_accuracy"] < own["masked_accuracy"] - 0.1, (own, other)


def test_the_centralized_budget_equals_the_federated_one(tiny_pretraining):
    cfg, result = tiny_pretraining
    budget = federated_budget(Path(cfg.federation.checkpoint_dir) / "metrics.jsonl")
    clients = [c for r in result["history"] for c in r.get("client_train", {}).values()]
    assert len(clients) == 2 * 3  # 2 rounds x 3 clients
    assert budget.steps == sum(c["steps"] for c in clients) > 0
    assert budget.examples == sum(c["num-examples"] for c in clients) > 0
    assert budget.batch_size == round(budget.examples / budget.steps)


@pytest.fixture(scope="module")
def evaluated(tiny_pretraining, tiny_distillation, federated_partitions, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    dcfg, _, _ = tiny_distillation
    sets = [f"data.librispeech_root={dcfg.data.librispeech_root}", f"data.partitions_dir={dcfg.data.partitions_dir}",
            f"federation.checkpoint_dir={dcfg.federation.checkpoint_dir}", *TINY,
            f"distillation.checkpoint_dir={dcfg.distillation.checkpoint_dir}", f"evaluation.output_dir={out}",
            *SMALL_KEYWORDS]
    args = [sys.executable, "evaluate.py", *[a for s in sets for a in ("--set", s)]]
    runs = [subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600) for _ in range(2)]
    return out, runs


def test_evaluate_writes_every_row(evaluated):
    out, runs = evaluated
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    for name in ("evaluation.json", "evaluation.md", "evaluation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 200, name
    report = json.loads((out / "evaluation.json").read_text())
    assert [r["name"] for r in report["rows"]] == list(ROWS)
    rows = {r["name"]: r for r in report["rows"]}
    for name, row in rows.items():
        for probe in ("speaker_id", "keyword"):
            assert 0.0 <= row[probe]["best_accuracy"] <= 1.0 and 0.0 <= row[probe]["weighted_accuracy"] <= 1.0
        assert 0.0 <= row["speaker_verification"]["eer"] <= 1.0
        assert (row["masked_prediction"] is None) == (name == "mfcc")
    assert len(rows["federated"]["speaker_id"]["per_layer"]) == 2  # the tiny model: CNN output + 1 layer
    assert rows["student"]["parameters"] < rows["federated"]["parameters"]
    assert rows["centralized"]["examples"] == rows["federated"]["examples"]  # equal compute
    assert rows["random-init"]["examples"] == 0
    assert "| federated |" in runs[1].stdout and "| mfcc |" in runs[1].stdout  # the console table
    assert "reusing" in runs[1].stderr  # the centralized model is cached, not retrained
    md = (out / "evaluation.md").read_text()
    assert all(f"| {name} |" in md for name in ROWS)


def test_evaluate_repeats_its_numbers(evaluated, tmp_path):
    out, runs = evaluated
    first = [line for line in runs[0].stdout.splitlines() if line.startswith("| ")]
    second = [line for line in runs[1].stdout.splitlines() if line.startswith("| ")]
    assert first == second and len(first) >= 2 + len(ROWS)


def test_a_rounds_global_model_with_its_compute(tiny_pretraining, tmp_path):
    """evaluate.py --round N: the federated row is round_N.pt, and compute (the centralized budget too)
    counts rounds 1..N only; a round no longer kept is one line naming the rounds that are."""
    from fedhubert.eval_rows import row_specs

    cfg, result = tiny_pretraining
    first = federated_budget(Path(cfg.federation.checkpoint_dir) / "metrics.jsonl", up_to_round=1)
    both = federated_budget(Path(cfg.federation.checkpoint_dir) / "metrics.jsonl")
    round1 = [c for r in result["history"] if r["round"] == 1 for c in r["client_train"].values()]
    assert first.examples == sum(c["num-examples"] for c in round1) and len(first.round_steps) == 1
    assert 0 < first.examples < both.examples
    (spec,) = row_specs(cfg, tmp_path, ["federated"], federated_round=1)
    assert spec.checkpoint.name == "round_1.pt" and spec.examples == first.examples
    with pytest.raises(DataError, match=r"--round 7: .*round_7.pt not found \(rounds kept: \[0, 1, 2\]"):
        row_specs(cfg, tmp_path, ["federated"], federated_round=7)


def test_the_cached_centralized_model_is_keyed_on_the_code(tmp_path, monkeypatch):
    """A fix to training or to the features must retrain the centralized row, not reuse the model an
    older version trained: the cache key holds the package's source, and only what changes it matters."""
    from fedhubert import centralized, fileio

    pooled = tmp_path / "pooled"
    pooled.mkdir()
    for split in ("train", "valid"):
        (pooled / f"{split}.tsv").write_text(f"/audio\n{split}.flac\t32000\n")
    cfg, budget = fed_config(("/x", "/y"), "/z"), centralized.Budget(6, 24, [3, 3])
    key = centralized._fingerprint(cfg, budget, pooled)
    assert centralized._fingerprint(cfg, budget, pooled) == key
    assert fileio.package_sha1() == fileio.package_sha1.__wrapped__()  # the cached value is the source's
    monkeypatch.setattr(centralized, "package_sha1", lambda: "0" * 40)  # as if a module had been edited
    assert centralized._fingerprint(cfg, budget, pooled) != key


def test_package_sha1_follows_every_source_file(tmp_path, monkeypatch):
    from fedhubert import fileio

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "fileio.py").write_text("a = 1\n")
    (package / "sub" / "m.py").write_text("b = 2\n")
    monkeypatch.setattr(fileio, "__file__", str(package / "fileio.py"))
    before = fileio.package_sha1.__wrapped__()
    (package / "sub" / "m.py").write_text("b = 3\n")
    assert fileio.package_sha1.__wrapped__() != before
    (package / "notes.txt").write_text("not code")
    (package / "sub" / "m.py").write_text("b = 2\n")
    assert fileio.package_sha1.__wrapped__() == before
