"""Checkpoints holding pickled objects (issue 11), against every checkpoint loader: refused, their code never run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fake_grid import tiny_cfg

# --- checkpoints holding pickled objects --------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it creates ``marker`` (torch's safe loader must never get that far)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class Settings:
    """A harmless class instance: still not plain data, so still refused."""

    def __init__(self) -> None:
        self.hidden_size = 32

def write_payload(path: Path, kind: str, marker: Path) -> Path:
    """A checkpoint-looking file at ``path``: a real tiny checkpoint whose extras (or model_cfg) carry ``kind``."""
    from fedhubert.checkpoint import save_checkpoint
    from fedhubert.federation.task import build_model

    cfg = tiny_cfg(path.parent)
    save_checkpoint(path, build_model(cfg), cfg, round=1)
    state = torch.load(path, weights_only=True)
    if kind == "code on unpickling":
        torch.save({**state, "round": Payload(marker)}, path)
    elif kind == "bare pickle":  # not torch's zip format at all: the legacy loader, pickle protocol 4
        path.write_bytes(pickle.dumps({**state, "head": Payload(marker)}, protocol=4))
    else:
        torch.save({**state, "model_cfg": Settings()}, path)
    return path


def _head_store_latest(path: Path) -> None:
    from fedhubert.federation.client_app import HeadStore

    HeadStore(path.parent, keep=2, prefix="head").latest(up_to=9)


def _resume(path: Path) -> None:
    from fedhubert.federation.rundir import prepare_checkpoint_dir
    from fedhubert.federation.tasks import get_task

    cfg = tiny_cfg(path.parent.parent.parent)  # <tmp>/ckpt/server/round_1.pt
    prepare_checkpoint_dir(cfg, get_task("pretraining"), {}, resume=True, overwrite=False)


def _init_checkpoint(path: Path) -> None:
    from fedhubert.federation.tasks import init_from_checkpoint

    init_from_checkpoint(tiny_cfg(path.parent, f"federation.init_checkpoint={path}"))


def _kmeans_features(path: Path) -> None:
    from fedhubert.features import HubertFeatures

    HubertFeatures(tiny_cfg(path.parent, "kmeans.features=hubert", f"kmeans.checkpoint={path}", "training.device=cpu"))


def _teacher(path: Path) -> None:
    from fedhubert.federation.tasks import load_teacher

    load_teacher(tiny_cfg(path.parent, f"distillation.teacher_model_path={path}"), {})


def _s3prl_upstream(path: Path) -> None:
    from fedhubert.evaluate import s3prl_upstream

    s3prl_upstream(path)


def _s3prl_runner(path: Path) -> None:
    from fedhubert import s3prl_runner

    s3prl_runner.check_arguments(["-m", "train", "-u", "hubert_local", "-k", str(path), "-d", "speech_commands",
                                  "-c", str(REPO / "configs" / "s3prl" / "speech_commands.yaml"), "--device", "cpu"])


def _saved_head(path: Path) -> None:
    from fedhubert.federation.tasks import saved_head

    saved_head(path.parent, "head", 9)


def _read(path: Path) -> None:
    from fedhubert.checkpoint import read_checkpoint

    read_checkpoint(path)


def _load(path: Path) -> None:
    from fedhubert.checkpoint import load_checkpoint

    load_checkpoint(path)


# (loader, where it finds its file under tmp_path, how it is called)
LOADERS = [
    ("read_checkpoint", "model.pt", _read),
    ("load_checkpoint", "model.pt", _load),
    ("--resume", "ckpt/server/round_1.pt", _resume),
    ("federation.init_checkpoint", "init.pt", _init_checkpoint),
    ("kmeans.checkpoint (HubertFeatures)", "features.pt", _kmeans_features),
    ("distillation teacher", "teacher.pt", _teacher),
    ("evaluation's s3prl upstream", "best.pt", _s3prl_upstream),
    ("run_s3prl_downstream -u hubert_local -k", "best.pt", _s3prl_runner),
    ("a client's head (HeadStore)", "clients/client_0/head_round_1.pt", _head_store_latest),
    ("a teacher head (saved_head)", "heads/head_round_1.pt", _saved_head),
]
PAYLOADS = ["code on unpickling", "bare pickle", "a class instance"]


def test_the_payload_is_live(tmp_path):
    """The files below would run their code if anything unpickled them unsafely."""
    marker = tmp_path / "ran"
    path = write_payload(tmp_path / "model.pt", "code on unpickling", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("loader, where, call", LOADERS, ids=[loader[0] for loader in LOADERS])
def test_every_loader_refuses_pickled_objects_without_running_them(tmp_path, monkeypatch, loader, where, call, kind):
    from fedhubert.errors import DataError

    # torch.load's default is weights_only, unless this is set: no loader may depend on that default (s3prl's does)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    write_payload(path, kind, marker)
    with pytest.raises(DataError) as raised:
        call(path)
    message = str(raised.value)
    assert str(path) in message and "refused: it holds pickled Python objects" in message, message
    assert "\n" not in message and "weights_only=False" not in message  # one line, and no advice to load it unsafely
    assert not marker.exists()
    if kind == "a class instance":
        assert f"GLOBAL {__name__}.Settings" in message
