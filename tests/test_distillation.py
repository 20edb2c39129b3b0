"""Federated distillation: the loss math, the student and its initialisation from the teacher, the
teacher's per-client heads, and the whole run on the bundled corpus (from the tiny pretraining of
conftest.tiny_pretraining): checkpoints, s3prl loading, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DISTILL_STUDENT, REPO, TINY, distill_config, teacher_path
from fedhubert.config import Config, load_config
from fedhubert.distill import (DistillationModel, default_target_layers, hidden_loss, init_from_teacher, kd_loss,
                               layer_map, logits_loss, student_config)
from fedhubert.errors import ConfigError, DataError
from fedhubert.federation.simulation import run_federated_distillation
from fedhubert.federation.tasks import DistillationTask, teacher_head
from fedhubert.model import HEAD_PARAM_PREFIXES, HubertBase

STUDENT = DISTILL_STUDENT
CPU = torch.device("cpu")


# --- loss math ---------------------------------------------------------------------------------------

def test_alpha_zero_is_cross_entropy_and_alpha_one_is_kd():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(50, 30, generator=gen), torch.randn(50, 30, generator=gen)
    targets = torch.randint(0, 30, (50,), generator=gen)
    ce_only, kd, ce = logits_loss(student, teacher, targets, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(ce_only, F.cross_entropy(student, targets))
    kd_only, _, _ = logits_loss(student, teacher, targets, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(kd_only, kd_loss(student, teacher, 2.0))
    half, _, _ = logits_loss(student, teacher, targets, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(half, 0.5 * kd + 0.5 * ce)
    assert kd > 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_is_zero_for_equal_logits_and_its_gradient_scales_with_t(temperature):
    gen = torch.Generator().manual_seed(1)
    teacher = 3 * torch.randn(20, 12, generator=gen)
    assert float(kd_loss(teacher.clone(), teacher, temperature)) == pytest.approx(0.0, abs=1e-6)
    student = (3 * torch.randn(20, 12, generator=gen)).requires_grad_()
    kd_loss(student, teacher, temperature).backward()
    t = temperature  # d/ds of T^2 KL(softmax(t/T) || softmax(s/T)), mean over N rows: T (p_s - p_t) / N
    expected = t * (F.softmax(student.detach() / t, -1) - F.softmax(teacher / t, -1)) / len(teacher)
    torch.testing.assert_close(student.grad, expected)


def test_hidden_loss_is_zero_for_identical_features_and_cos_term_is_distilhuberts():
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(40, 8, generator=gen)
    total, l1, cos = hidden_loss(target.clone(), target, cos_weight=1.0)
    assert float(total) == pytest.approx(0.0, abs=1e-6) and float(l1) == 0.0
    _, _, opposite = hidden_loss(-target, target, cos_weight=1.0)
    assert float(opposite) == pytest.approx(1.0, abs=1e-5)  # log sigmoid(1) - log sigmoid(-1) = 1
    pred = torch.randn(40, 8, generator=gen, requires_grad=True)
    total, l1, cos = hidden_loss(pred, target, cos_weight=0.7)
    torch.testing.assert_close(l1, (pred - target).abs().mean())
    torch.testing.assert_close(total, l1 + 0.7 * cos)
    cos.backward()  # the same gradient as DistilHuBERT's -log sigmoid(cos) term
    theirs = pred.detach().clone().requires_grad_()
    (-F.logsigmoid(F.cosine_similarity(theirs, target, dim=-1))).mean().backward()
    torch.testing.assert_close(pred.grad, theirs.grad)


# --- the student -------------------------------------------------------------------------------------

def test_target_layers_and_layer_map():
    assert default_target_layers(12) == [4, 8, 12] and default_target_layers(2) == [1, 2]
    assert default_target_layers(1) == [1]
    assert layer_map(6, 12) == [1, 3, 5, 7, 9, 11] and layer_map(2, 2) == [0, 1]


def _student(cfg: Config, teacher: HubertBase) -> DistillationModel:
    torch.manual_seed(3)
    return DistillationModel(student_config(cfg, teacher.cfg), teacher.cfg.hidden_size, [1])


def test_student_copies_the_teacher_cnn_and_layers_only_when_shapes_match():
    teacher_cfg = load_config(REPO / "configs/pretraining_config.yaml", TINY + ["model.num_hidden_layers=2"])
    torch.manual_seed(0)
    teacher = HubertBase.from_config(teacher_cfg)
    cfg = load_config(REPO / "configs/pretraining_config.yaml", TINY + STUDENT)
    student = _student(cfg, teacher)
    assert init_from_teacher(student, teacher, ["cnn"]) == ["CNN feature encoder"]
    for (name, a), b in zip(student.student.feature_extractor.state_dict().items(),
                            teacher.feature_extractor.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(student.student.encoder.layers[0].fc1.weight[:16, :16], teacher.encoder.layers[0].fc1.weight[:16, :16])

    narrow = load_config(REPO / "configs/pretraining_config.yaml", TINY + STUDENT + ["distillation.student_conv_dim=16"])
    with pytest.raises(ConfigError, match="student_conv_dim"):
        init_from_teacher(_student(narrow, teacher), teacher, ["cnn"])
    with pytest.raises(ConfigError, match="'layers'"):  # 16 wide student, 32 wide teacher: never a partial copy
        init_from_teacher(student, teacher, ["layers"])

    same_width = load_config(REPO / "configs/pretraining_config.yaml", TINY + [
        "distillation.student_hidden_size=32", "distillation.student_num_layers=1",
        "distillation.student_num_attention_heads=2", "distillation.student_intermediate_size=64"])
    wide = _student(same_width, teacher)
    copied = init_from_teacher(wide, teacher, ["cnn", "layers"])
    assert "layer 0 <- teacher layer 1" in copied
    for (name, a), b in zip(wide.student.encoder.layers[0].state_dict().items(),
                            teacher.encoder.layers[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_student_sizes_match_the_published_models():
    base = Config()  # HuBERT Base: 94.7 M parameters; DistilHuBERT (2 x 768) 23.5 M
    torch.manual_seed(0)
    teacher_params = sum(p.numel() for p in HubertBase.from_config(base).parameters())
    distil = load_config(REPO / "configs/distillation_config.yaml", [
        "distillation.student_hidden_size=768", "distillation.student_num_layers=2",
        "distillation.student_num_attention_heads=12", "distillation.student_intermediate_size=3072"])
    student = HubertBase.from_config(student_config(distil, base.model))
    encoder_params = sum(p.numel() for n, p in student.named_parameters() if not n.startswith(HEAD_PARAM_PREFIXES))
    assert teacher_params / 1e6 == pytest.approx(94.7, abs=0.1)  # with its prediction head, as fairseq counts
    assert encoder_params / 1e6 == pytest.approx(23.5, abs=0.1)  # what downstream tasks use


# --- the teacher's heads -----------------------------------------------------------------------------

def test_each_client_distils_with_its_own_pretrained_head(federated_partitions, tiny_pretraining, tmp_path):
    cfg = distill_config(federated_partitions, tiny_pretraining, tmp_path / "distill")
    best_round = tiny_pretraining[1]["best_round"]
    clients = Path(tiny_pretraining[0].federation.checkpoint_dir) / "clients"
    heads = [torch.load(clients / f"client_{k}" / f"head_round_{best_round}.pt", weights_only=True)["head"]
             for k in range(3)]
    global_weights = torch.load(teacher_path(tiny_pretraining), weights_only=True)["model_weight"]
    task = DistillationTask()
    for k in range(3):
        loss = task.client_loss(cfg, k, {}, Path(cfg.data.partitions_dir) / f"client_{k}", CPU)
        teacher_head_now = {n: t for n, t in loss.teacher.state_dict().items() if n.startswith(HEAD_PARAM_PREFIXES)}
        assert set(teacher_head_now) == set(heads[k])
        for name, tensor in teacher_head_now.items():
            assert torch.equal(tensor, heads[k][name]), (k, name)
            assert not torch.equal(tensor, heads[(k + 1) % 3][name]), (k, name)
            assert not torch.equal(tensor, global_weights[name]), (k, name)
        assert not loss.teacher.training and not any(p.requires_grad for p in loss.teacher.parameters())


def test_changed_targets_are_refused(federated_partitions, tiny_pretraining, tmp_path):
    parts = tmp_path / "partitions"
    shutil.copytree(federated_partitions[1], parts)
    km = parts / "client_1" / "train.km"
    km.write_text(km.read_text().replace(" 3 ", " 4 ", 1))  # one label changed: the head no longer fits
    cfg = distill_config((federated_partitions[0], parts), tiny_pretraining, tmp_path / "distill")
    with pytest.raises(DataError, match="client_1/train.km changed"):
        DistillationTask().preflight(cfg)


# --- the federated run -------------------------------------------------------------------------------

def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def distilled(tiny_distillation):
    return tiny_distillation


def test_two_rounds_write_the_outputs_and_lower_the_distillation_loss(distilled, tiny_pretraining):
    cfg, result, (teacher_sha, teacher_weights) = distilled
    out = Path(cfg.distillation.checkpoint_dir)
    for name in ("server/round_0.pt", "server/round_2.pt", "server/best_student_model.pt",
                 "server/best_student_model_hf/config.json", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    for k in range(3):
        assert (out / "clients" / f"client_{k}" / "student_head_round_2.pt").is_file()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1, 2]
    assert history[2]["val"]["loss"] < history[0]["val"]["loss"]
    for key in ("masked_kd_loss", "masked_ce_loss", "hidden_loss", "hidden_loss_layer1", "masked_agreement",
                "masked_accuracy"):
        assert key in history[1]["train"] and key in history[2]["val"], key

    # what travels: the student encoder and the hidden heads, float32; the student's head stays
    model = DistillationTask().client_model(cfg, {})
    shared = [t for n, t in model.state_dict().items() if not DistillationModel.is_local(n)]
    assert history[1]["bytes_sent_per_client"] == sum(t.numel() * 4 for t in shared)
    saved = torch.load(out / "server" / "best_student_model.pt", weights_only=True)
    assert "hidden_heads" in saved and not any(k.startswith("hidden_heads") for k in saved["model_weight"])

    # the teacher is bit-identical after the run
    teacher = teacher_path(tiny_pretraining)
    assert sha1(teacher) == teacher_sha
    after = torch.load(teacher, weights_only=True)["model_weight"]
    assert all(torch.equal(after[k], v) for k, v in teacher_weights.items())


def test_best_student_loads_in_s3prl_in_a_fresh_process(distilled, tmp_path):
    cfg, _, _ = distilled
    ckpt = Path(cfg.distillation.checkpoint_dir) / "server" / "best_student_model.pt"
    wav = REPO / "corpus/LibriSpeech/test-other/1688/142285/1688-142285-0000.flac"
    out = tmp_path / "hidden.pt"
    code = ("import fedhubert.compat, s3prl.hub, torch; from fedhubert.audio import load_audio; "
            f"up = s3prl.hub.hubert_local(ckpt={str(ckpt)!r}).eval(); w = load_audio({str(wav)!r}, 16000)[:32000]; "
            f"torch.save([h.detach() for h in up([w])['hidden_states']], {str(out)!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(out, weights_only=True)
    from fedhubert.audio import load_audio
    from fedhubert.checkpoint import load_checkpoint
    student, student_cfg, _ = load_checkpoint(ckpt)
    assert student_cfg.model.hidden_size == 16 and len(theirs) == student_cfg.model.num_hidden_layers + 1
    with torch.no_grad():
        ours, _ = student.eval().extract_hidden_states(load_audio(wav, 16000)[:32000][None])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resume_matches_an_uninterrupted_run(distilled, federated_partitions, tiny_pretraining, tmp_path):
    cfg2, _, _ = distilled
    cfg1 = distill_config(federated_partitions, tiny_pretraining, tmp_path / "resumed", "distillation.num_rounds=1")
    run_federated_distillation(cfg1)
    cfg1.distillation.num_rounds = 2
    run_federated_distillation(cfg1, resume=True)
    a = torch.load(tmp_path / "resumed" / "server" / "round_2.pt", weights_only=True)
    b = torch.load(Path(cfg2.distillation.checkpoint_dir) / "server" / "round_2.pt", weights_only=True)
    for name, tensor in b["model_weight"].items():
        torch.testing.assert_close(a["model_weight"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in b["hidden_heads"].items():
        torch.testing.assert_close(a["hidden_heads"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["round"] for r in a["metrics_history"]] == [0, 1, 2]


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, override, named", [
    ("missing teacher", "distillation.teacher_model_path={tmp}/none.pt", "none.pt"),
    ("foreign teacher", "distillation.teacher_model_path={tmp}/foreign.pt", "foreign.pt"),
    ("label mismatch", "model.vocab_size=104", "run_pretraining.sh"),
    ("unknown loss", "distillation.losses=[logits,attention]", "distillation.losses[1]"),
    ("heads do not divide", "distillation.student_num_attention_heads=3", "distillation.student_num_attention_heads"),
])
def test_bad_input_stops_in_one_line(case, override, named, federated_partitions, tiny_pretraining, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    cfg = distill_config(federated_partitions, tiny_pretraining, tmp_path / "out")
    sets = [f"data.librispeech_root={cfg.data.librispeech_root}", f"data.partitions_dir={cfg.data.partitions_dir}",
            f"federation.checkpoint_dir={cfg.federation.checkpoint_dir}", *TINY, *STUDENT,
            f"distillation.teacher_model_path={cfg.distillation.teacher_model_path}",
            f"distillation.checkpoint_dir={tmp_path / 'out'}", override.format(tmp=tmp_path)]
    done = subprocess.run([sys.executable, "federated_distillation.py", *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], (case, lines)
    assert not (tmp_path / "out").exists()
