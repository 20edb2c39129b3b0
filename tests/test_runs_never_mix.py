"""Runs never mix, and nothing is lost: a fresh run refuses a checkpoint folder that holds an earlier run
(or, with --overwrite, moves that run aside whole), --resume refuses checkpoints of an incompatible
config naming the key, and a device or precision the machine lacks stops every script in one line
before anything is written. Only one test starts a Flower simulation; the others stop before it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import BASE_CONFIG, DISTILL_STUDENT, REPO, TINY, fed_config
from fedhubert.checkpoint import save_checkpoint
from fedhubert.config import Config
from fedhubert.errors import ConfigError, FederationError
from fedhubert.federation.rundir import check_resume, prepare_checkpoint_dir
from fedhubert.federation.task import absolutize_paths, build_model
from fedhubert.federation.tasks import DistillationTask, FederatedTask
from fedhubert.train import check_device, parse_device

CUDA = torch.cuda.is_available()


def earlier_run(cfg: Config, folder: Path, rounds: tuple[int, ...] = (1, 2), best: str = "best_global_model") -> None:
    """What a run of ``cfg`` leaves in ``folder``: round checkpoints (with the labels the server records),
    the best model, metrics, TensorBoard events and a client's head."""
    saved = absolutize_paths(copy.deepcopy(cfg))
    labels = FederatedTask().check_label_space(saved)
    model = build_model(saved)
    for rnd in rounds:
        save_checkpoint(folder / "server" / f"round_{rnd}.pt", model, saved, round=rnd, **labels)
    save_checkpoint(folder / "server" / f"{best}.pt", model, saved, round=rounds[-1], **labels)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "val": {"loss": 9.0 - r}}) + "\n"
                                                  for r in (0, *rounds)))
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"earlier events")
    (folder / "clients" / "client_0").mkdir(parents=True)
    torch.save({"round": rounds[-1], "head": {}}, folder / "clients" / "client_0" / f"head_round_{rounds[-1]}.pt")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def used(federated_partitions, tmp_path) -> tuple[Config, Path, dict[str, bytes]]:
    """(the tiny federation's config, its checkpoint folder holding an earlier run, that run's bytes)."""
    folder = tmp_path / "ckpt"
    cfg = fed_config(federated_partitions, folder, "federation.num_rounds=1")
    earlier_run(cfg, folder)
    return cfg, folder, snapshot(folder)


def one_line(message: str, *words: str) -> None:
    assert "\n" not in message and all(w in message for w in words), message


# --- a fresh run into a used folder -----------------------------------------------------------------

def test_a_fresh_run_into_a_used_folder_refuses_and_loses_nothing(used):
    from fedhubert.federation.simulation import run_federated_pretraining

    cfg, folder, before = used
    with pytest.raises(FederationError) as err:
        run_federated_pretraining(cfg)  # refused before Ray starts: no simulation runs here
    one_line(str(err.value), str(folder), "server/", "metrics.jsonl", "--resume", "federation.checkpoint_dir",
             "--overwrite")
    assert snapshot(folder) == before
    assert [p.name for p in folder.parent.iterdir()] == ["ckpt"]  # nothing moved, nothing new beside it


def test_the_script_refuses_in_one_line_with_exit_2(used):
    cfg, folder, before = used
    sets = [f"data.librispeech_root={cfg.data.librispeech_root}", f"data.partitions_dir={cfg.data.partitions_dir}",
            *TINY, f"federation.checkpoint_dir={folder}", "federation.num_rounds=1"]
    done = subprocess.run([sys.executable, "federated_hubert_pretraining.py", *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-2000:]
    one_line(lines[0], "holds an earlier run", "--resume", "--overwrite")
    assert snapshot(folder) == before


def test_overwrite_moves_the_earlier_run_aside_whole_and_starts_afresh(used):
    from fedhubert.federation.simulation import run_federated_pretraining

    cfg, folder, before = used
    result = run_federated_pretraining(cfg, overwrite=True)  # the one simulation of this file: 1 round
    moved = [p for p in folder.parent.iterdir() if p.name.startswith("ckpt.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == before  # every file of the earlier run, byte for byte
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1] == [r["round"] for r in result["history"]]
    assert sorted(p.name for p in (folder / "server").glob("round_*.pt")) == ["round_0.pt", "round_1.pt"]
    assert not (folder / "clients" / "client_0" / "head_round_2.pt").exists()


def test_overwrite_never_moves_a_folder_the_run_reads_from(federated_partitions, tmp_path):
    folder = tmp_path / "out"
    cfg = fed_config(federated_partitions, folder, f"federation.init_checkpoint={folder / 'server' / 'round_2.pt'}")
    earlier_run(cfg, folder)
    before = snapshot(folder)
    with pytest.raises(FederationError) as err:
        prepare_checkpoint_dir(absolutize_paths(cfg), FederatedTask(), {}, resume=False, overwrite=True)
    one_line(str(err.value), "federation.init_checkpoint", "another federation.checkpoint_dir")
    assert snapshot(folder) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_resume_and_overwrite_exclude_each_other(monkeypatch, used):
    from fedhubert.cli import federated_main

    cfg, folder, before = used
    monkeypatch.setattr(sys, "argv", ["federated_hubert_pretraining.py", "--resume", "--overwrite"])
    with pytest.raises(SystemExit) as exit_:
        federated_main("pretraining", "test", str(BASE_CONFIG))
    assert exit_.value.code == 2
    with pytest.raises(FederationError, match="exclude each other"):  # the deployment's run config: the same
        prepare_checkpoint_dir(absolutize_paths(cfg), FederatedTask(), {}, resume=True, overwrite=True)
    assert snapshot(folder) == before


def test_a_fresh_distillation_into_a_used_folder_refuses(federated_partitions, tmp_path):
    from fedhubert.federation.simulation import run_federated_distillation

    teacher = tmp_path / "teacher" / "server" / "best_global_model.pt"
    earlier_run(fed_config(federated_partitions, teacher.parent.parent), teacher.parent.parent)
    folder = tmp_path / "distill"
    cfg = fed_config(federated_partitions, teacher.parent.parent, *DISTILL_STUDENT, "distillation.losses=[hidden]",
                     f"distillation.teacher_model_path={teacher}", f"distillation.checkpoint_dir={folder}")
    earlier_run(cfg, folder, best="best_student_model")
    before = snapshot(folder)
    with pytest.raises(FederationError) as err:
        run_federated_distillation(cfg)
    one_line(str(err.value), str(folder), "distillation.checkpoint_dir", "--resume", "--overwrite")
    assert snapshot(folder) == before


# --- --resume of an incompatible config ---------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=64", "model.hidden_size"),
    ("model.num_hidden_layers=2", "model.num_hidden_layers"),
    ("partition.num_clients=2", "partition.num_clients"),
    ("data.partitions_dir={tmp}/other", "data.partitions_dir"),
    ("kmeans.codebook=federated", "kmeans.codebook"),
])
def test_resume_refuses_another_model_data_or_codebook_naming_the_key(used, override, key, tmp_path):
    cfg, folder, before = used
    other = fed_config((cfg.data.librispeech_root, cfg.data.partitions_dir), folder, override.format(tmp=tmp_path))
    with pytest.raises(ConfigError) as err:
        check_resume(absolutize_paths(other), FederatedTask(), {})
    one_line(str(err.value), "--resume", "round_2.pt", key, "federation.checkpoint_dir")
    assert snapshot(folder) == before


def test_resume_refuses_before_the_simulation_starts(used):
    from fedhubert.federation.simulation import run_federated_pretraining

    cfg, folder, before = used
    other = fed_config((cfg.data.librispeech_root, cfg.data.partitions_dir), folder, "model.intermediate_size=128")
    with pytest.raises(ConfigError, match="model.intermediate_size"):
        run_federated_pretraining(other, resume=True)
    assert snapshot(folder) == before


def test_resume_goes_on_with_other_training_knobs(used):
    cfg, folder, _ = used
    longer = fed_config((cfg.data.librispeech_root, cfg.data.partitions_dir), folder, "federation.num_rounds=5",
                        "training.learning_rate=3e-4", "federation.strategy=fedavg", "model.layerdrop=0.1")
    longer = absolutize_paths(longer)
    labels = FederatedTask().check_label_space(longer)
    assert prepare_checkpoint_dir(longer, FederatedTask(), labels, resume=True, overwrite=False) == \
        (2, folder / "server" / "round_2.pt")


def test_resume_of_a_distillation_refuses_another_student(federated_partitions, tmp_path):
    folder = tmp_path / "distill"
    saved = absolutize_paths(fed_config(federated_partitions, tmp_path / "ckpt", *DISTILL_STUDENT,
                                        f"distillation.checkpoint_dir={folder}"))
    save_checkpoint(folder / "server" / "round_1.pt", build_model(saved), saved, round=1)
    wider = fed_config(federated_partitions, tmp_path / "ckpt", *DISTILL_STUDENT, f"distillation.checkpoint_dir={folder}",
                       "distillation.student_hidden_size=32")
    with pytest.raises(ConfigError) as err:
        check_resume(absolutize_paths(wider), DistillationTask(), {})
    one_line(str(err.value), "distillation.student_hidden_size", "distillation.checkpoint_dir")
    longer = absolutize_paths(fed_config(federated_partitions, tmp_path / "ckpt", *DISTILL_STUDENT,
                                         f"distillation.checkpoint_dir={folder}", "distillation.num_rounds=4"))
    assert check_resume(longer, DistillationTask(), {})[0] == 1


# --- the deployment's ServerApp (flwr run): the same rules, from its run config ------------------------

class StopAtFirstMessage:
    """A Grid stand-in: the server must have checked everything before it asks the grid anything."""

    def __getattr__(self, name: str):
        raise RuntimeError(f"first message ({name})")


def test_the_deployment_server_refuses_or_moves_aside_from_its_run_config(used):
    from fedhubert.federation.server_app import main

    cfg, folder, before = used
    overrides = " ".join([f"data.librispeech_root={cfg.data.librispeech_root}",
                          f"data.partitions_dir={cfg.data.partitions_dir}", *TINY, f"federation.checkpoint_dir={folder}"])
    run_config = {"config": str(BASE_CONFIG), "overrides": overrides, "resume": False, "task": "pretraining"}
    with pytest.raises(FederationError, match="holds an earlier run"):
        main(StopAtFirstMessage(), SimpleNamespace(run_config=run_config))
    with pytest.raises(ConfigError, match="training.device"):
        main(StopAtFirstMessage(), SimpleNamespace(run_config={**run_config, "overwrite": True,
                                                               "overrides": overrides + " training.device=tpu"}))
    assert snapshot(folder) == before
    with pytest.raises(RuntimeError, match="first message"):
        main(StopAtFirstMessage(), SimpleNamespace(run_config={**run_config, "overwrite": True}))
    moved = [p for p in folder.parent.iterdir() if p.name.startswith("ckpt.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == before and not folder.exists()


# --- training.device and training.precision, before anything ------------------------------------------

def device_config(*overrides: str) -> Config:
    return fed_config(("/x", "/y"), "/z", *overrides)


def test_device_and_precision_are_checked_for_this_machine():
    for device in ("tpu", "mps", "xla", "cuda:x"):
        with pytest.raises(ConfigError, match="training.device"):
            parse_device(device)
    assert check_device(device_config("training.device=auto")) == torch.device("cuda" if CUDA else "cpu")
    assert check_device(device_config("training.device=cpu", "training.precision=bf16")) == torch.device("cpu")
    if CUDA:  # the GPU path stays open
        assert check_device(device_config("training.device=cuda", "training.precision=fp16")).type == "cuda"
        assert check_device(device_config("training.device=cuda:0")).type == "cuda"
        with pytest.raises(ConfigError, match="training.device"):
            check_device(device_config(f"training.device=cuda:{torch.cuda.device_count()}"))
    else:
        for overrides in (["training.device=cuda"], ["training.device=cuda:0"]):
            with pytest.raises(ConfigError, match="training.device"):
                check_device(device_config(*overrides))
        for device in ("auto", "cpu"):
            with pytest.raises(ConfigError, match="training.precision"):
                check_device(device_config(f"training.device={device}", "training.precision=fp16"))


SCRIPTS = ["partition_data.py", "generate_kmeans_targets.py", "federated_hubert_pretraining.py",
           "federated_distillation.py", "evaluate.py", "check_s3prl_load.py"]


NO_FP16 = pytest.mark.skipif(CUDA, reason="fp16 is valid where CUDA is")


@pytest.mark.parametrize("script, override, key", [
    *[(script, "training.device=tpu", "training.device") for script in SCRIPTS],
    *[pytest.param(script, "training.precision=fp16", "training.precision", marks=NO_FP16)
      for script in ("federated_hubert_pretraining.py", "federated_distillation.py", "evaluate.py")],
])
def test_every_script_stops_in_one_line_before_writing(script, override, key, tmp_path):
    out = tmp_path / "out"
    sets = [f"data.partitions_dir={out / 'partitions'}", f"federation.checkpoint_dir={out / 'ckpt'}",
            f"distillation.checkpoint_dir={out / 'distill'}", f"evaluation.output_dir={out / 'eval'}", override]
    done = subprocess.run([sys.executable, script, *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], lines
    assert not out.exists()


# --- federated k-means: its outputs in data.partitions_dir are replaced whole, never paired with another run's

def test_a_kmeans_rerun_replaces_every_output_of_the_earlier_run(tmp_path):
    """The partitions folder holds the data too, so k-means cannot move it aside: a rerun (here another
    kmeans.n_clusters) rewrites kmeans_metrics.jsonl from round 0 (never appends), and codebook.npy and
    targets.json are its own. In-process (fake_grid.KmeansClients): no simulation."""
    from fake_grid import read_jsonl, run_kmeans
    from fedhubert.fileio import file_sha1

    run_kmeans(tmp_path)
    run_kmeans(tmp_path, None, "kmeans.n_clusters=10")
    history = read_jsonl(tmp_path / "kmeans_metrics.jsonl")
    assert [r["round"] for r in history] == [0, 1, 2] and {r["n_clusters"] for r in history} == {10}
    assert np.load(tmp_path / "codebook.npy").shape[0] == 10
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert targets["n_clusters"] == 10 and targets["codebook_sha1"] == file_sha1(tmp_path / "codebook.npy")


def test_a_failed_kmeans_rerun_leaves_no_earlier_codebook_beside_its_metrics(tmp_path):
    """A rerun that fails leaves its own kmeans_metrics.jsonl and neither the earlier run's codebook nor its
    targets.json: a federated head then refuses in one line instead of training on labels of two runs."""
    from fake_grid import kmeans_cfg, read_jsonl, run_kmeans
    from fedhubert.errors import DataError
    from fedhubert.federation.kmeans_app import STATS
    from fedhubert.targets import check_codebook

    run_kmeans(tmp_path)
    before = (tmp_path / "codebook.npy").read_bytes()
    with pytest.raises(FederationError, match="k-means round 2: 1 of 3 clients succeeded"):
        run_kmeans(tmp_path, {(STATS, 2, 0): "raise", (STATS, 2, 1): "raise"}, "kmeans.n_clusters=10")
    assert [(r["round"], r["n_clusters"]) for r in read_jsonl(tmp_path / "kmeans_metrics.jsonl")] == [(0, 10), (1, 10)]
    assert not (tmp_path / "codebook.npy").exists() and not (tmp_path / "targets.json").exists() and before
    with pytest.raises(DataError) as err:
        check_codebook(kmeans_cfg(tmp_path))
    one_line(str(err.value), str(tmp_path / "codebook.npy"), "generate_kmeans_targets.py")


# --- the evaluation: one config per evaluation.output_dir ------------------------------------------------

def evaluation_folder(cfg: Config, folder: Path) -> dict[str, bytes]:
    """What evaluate.py leaves: evaluation.json recording ``cfg``, the table, the charts, a cached model."""
    (folder / "centralized").mkdir(parents=True)
    (folder / "centralized" / "model.pt").write_bytes(b"an expensive centralized model")
    (folder / "evaluation.json").write_text(json.dumps({"rows": [], "config": cfg.to_dict()}))
    for name in ("evaluation.md", "evaluation.png", "learning_curves.png"):
        (folder / name).write_bytes(b"earlier " + name.encode())
    return snapshot(folder)


def test_an_evaluation_of_another_config_refuses_and_overwrite_moves_it_aside(tmp_path):
    from fedhubert.eval_rows import EVALUATION_INPUTS, run_evaluation
    from fedhubert.federation.rundir import check_earlier_output

    folder = tmp_path / "eval"
    made = device_config(f"evaluation.output_dir={folder}")
    before = evaluation_folder(made, folder)
    other = device_config(f"evaluation.output_dir={folder}", "model.hidden_size=64")
    with pytest.raises(ConfigError) as err:
        run_evaluation(other)  # refused before any data is read: /x and /y do not exist
    one_line(str(err.value), str(folder), "evaluation.json: model.hidden_size", "evaluation.output_dir",
             "--overwrite")
    assert snapshot(folder) == before

    def check(cfg: Config, overwrite: bool = False) -> None:
        check_earlier_output(cfg, folder, folder / "evaluation.json", "evaluation.output_dir", EVALUATION_INPUTS,
                             overwrite, ignore=("evaluation.rows", "training.device"))

    check(device_config(f"evaluation.output_dir={folder}", "evaluation.rows=[mfcc]", "training.device=cpu"))
    assert snapshot(folder) == before  # the same config (other rows, another device): its table is replaced
    reads_it = device_config(f"evaluation.output_dir={folder}", "model.hidden_size=64",
                             f"evaluation.centralized_init={folder / 'centralized' / 'model.pt'}")
    with pytest.raises(FederationError, match="evaluation.centralized_init"):
        check(reads_it, overwrite=True)  # never moves away what the run reads
    check(other, overwrite=True)
    assert not folder.exists()
    (moved,) = tmp_path.glob("eval.old-*")
    assert snapshot(moved) == before


def test_evaluate_py_refuses_another_config_with_exit_2_and_overwrite_moves_it(tmp_path, monkeypatch, capsys):
    """evaluate.py's --overwrite, in-process (its imports cost ~30 s in a subprocess here)."""
    import runpy

    folder = tmp_path / "eval"
    before = evaluation_folder(device_config(f"evaluation.output_dir={folder}"), folder)
    sets = ["data.librispeech_root=/x", "data.partitions_dir=/y", "federation.checkpoint_dir=/z", *TINY,
            f"evaluation.output_dir={folder}", "model.hidden_size=64"]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *[a for s in sets for a in ("--set", s)]])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "evaluate.py"), run_name="__main__")
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1 and "--overwrite" in lines[0], lines
    assert snapshot(folder) == before
    monkeypatch.setattr(sys, "argv", sys.argv + ["--overwrite"])
    with pytest.raises(SystemExit):  # moved aside, then the evaluation itself stops: /x holds no corpus
        runpy.run_path(str(REPO / "evaluate.py"), run_name="__main__")
    (moved,) = tmp_path.glob("eval.old-*")
    assert snapshot(moved) == before


def test_an_evaluation_without_curves_leaves_no_earlier_learning_curves(tmp_path):
    from fedhubert.report import write_report

    (tmp_path / "learning_curves.png").write_bytes(b"an earlier run's curves")
    probe = {"best_accuracy": 0.5, "weighted_accuracy": 0.5, "best_layer": 0, "chance": 0.25, "eer": 0.2}
    row = {"name": "mfcc", "parameters": 0, "examples": 0, "compute_audio_hours": 0.0, "speaker_id": probe,
           "speaker_verification": probe, "keyword": probe, "masked_prediction": None, "curve": None,
           "health": {"min_effective_rank": 3.0, "max_mean_cosine": 0.1}}
    data = {"clips": 4, "seconds": 4.0, "classes": 2, "test_clips": 2}
    write_report({"rows": [row], "data": {"speaker": data, "keyword": data}, "crop_seconds": 1.0}, tmp_path)
    assert (tmp_path / "evaluation.md").is_file() and not (tmp_path / "learning_curves.png").exists()


def test_a_second_demo_moves_every_earlier_output_aside_rather_than_stopping():
    """run_demo.sh runs again afresh: each stage that refuses a used folder (pretraining, distillation,
    the evaluation) gets --overwrite, so a second demo (or one with other --set values) is not refused
    at its last stage after minutes of training."""
    script = (REPO / "run_demo.sh").read_text()
    for stage in ("federated_hubert_pretraining.py", "federated_distillation.py", "evaluate.py"):
        line = next(line for line in script.splitlines() if line.startswith(f"python {stage}"))
        assert "--overwrite" in line, line
