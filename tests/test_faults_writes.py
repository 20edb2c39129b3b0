"""Checkpoint writes cut short (issue 11): a rename that never happens, a full disk, a SIGKILL, against the
files left behind and --resume; the ServerApp runs on a fake Grid (fake_grid.py), without a simulation."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fake_grid import read_jsonl, run, server_cfg, tiny_cfg
from fedhubert.errors import FederationError
from fedhubert.federation.rundir import round_files

# --- checkpoint writes cut short ------------------------------------------------------------------------

def half_written(exc: BaseException):
    """A torch.save that writes half of the file, then fails with ``exc`` (the disk filled up)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise exc
    return save


def no_rename(exc: BaseException):
    """An os.replace that never happens: the process fails (or is interrupted) between write and rename."""
    def replace(src, dst):
        raise exc
    return replace


TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
WRITE_FAULTS = [
    ("disk full (OSError ENOSPC)", "torch.save", half_written(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
     "[Errno 28] No space left on device"),
    # what torch's zip writer raises on a full disk (measured: torch.save to /dev/full)
    ("disk full (torch's writer)", "torch.save", half_written(RuntimeError(TORCH_FULL_DISK)), TORCH_FULL_DISK),
    ("the rename fails", "os.replace", no_rename(OSError(errno.EIO, os.strerror(errno.EIO))),
     "[Errno 5] Input/output error"),
    ("interrupted before the rename", "os.replace", no_rename(KeyboardInterrupt()), None),
]


@pytest.mark.parametrize("case, target, fault, reason", WRITE_FAULTS, ids=[w[0] for w in WRITE_FAULTS])
def test_a_failed_checkpoint_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch, case, target,
                                                                               fault, reason):
    import fedhubert.fileio
    from fedhubert.checkpoint import load_checkpoint, save_checkpoint
    from fedhubert.errors import OutputError
    from fedhubert.federation.task import build_model

    cfg = tiny_cfg(tmp_path)
    path = tmp_path / "server" / "best_global_model.pt"  # rewritten in place whenever the model improves
    save_checkpoint(path, build_model(cfg), cfg, round=1)
    before = path.read_bytes()
    model = build_model(cfg)
    torch.nn.init.zeros_(model.final_proj.weight)
    monkeypatch.setattr(*((torch, "save") if target == "torch.save" else (fedhubert.fileio.os, "replace")), fault)
    with pytest.raises(KeyboardInterrupt if reason is None else OutputError) as raised:
        save_checkpoint(path, model, cfg, round=2)
    monkeypatch.undo()
    if reason is not None:
        message = str(raised.value)
        assert message.startswith(f"could not write {path} ({reason}; ") and " MiB free there); an earlier file of " \
            "that name is unchanged" in message, message
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert load_checkpoint(path)[2]["round"] == 1


def test_a_full_disk_stops_the_run_at_the_last_good_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    cfg = server_cfg(tmp_path, "federation.num_rounds=2")
    server = tmp_path / "ckpt" / "server"
    full_disk, before = half_written(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), {}
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".round_2.pt."):  # the disk fills up while round 2 is written
            before.update({p.name: p.read_bytes() for p in server.iterdir() if p.name != Path(f).name})
            return full_disk(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(FederationError) as raised:
        run(cfg)
    message = str(raised.value)
    assert message.startswith(f"round 2: could not write {server / 'round_2.pt'} ([Errno 28] No space left on device; ")
    assert f"Last good checkpoint: {server / 'round_1.pt'} " in message
    monkeypatch.undo()
    assert sorted(before) == ["best_global_model.pt", "round_0.pt", "round_1.pt"]
    assert {p.name: p.read_bytes() for p in server.iterdir()} == before  # byte for byte, and no temporary file

    result = run(server_cfg(tmp_path, "federation.num_rounds=2"), resume=True)
    assert [r["round"] for r in result["history"]] == [0, 1, 2]
    assert [r["round"] for r in read_jsonl(tmp_path / "ckpt" / "metrics.jsonl")] == [0, 1, 2]
    assert [rnd for rnd, _ in round_files(server)] == [0, 1, 2]
    assert not [p for p in server.iterdir() if p.name.endswith(".tmp")]


KILLED_WRITE = """
import json, os, signal, sys
import fedhubert.fileio
from fedhubert.checkpoint import save_checkpoint
from fedhubert.config import config_from_dict
from fedhubert.federation.task import build_model

cfg = config_from_dict(json.loads(sys.argv[1]))
fedhubert.fileio.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # dies before the rename
save_checkpoint(sys.argv[2], build_model(cfg), cfg, round=2)
"""


def test_a_write_killed_before_its_rename_is_never_resumed_from(tmp_path):
    from fedhubert.federation.rundir import check_resume
    from fedhubert.federation.server_app import ServerCheckpoints
    from fedhubert.federation.task import absolutize_paths
    from fedhubert.federation.tasks import get_task

    run(server_cfg(tmp_path, "federation.num_rounds=1"))
    server = tmp_path / "ckpt" / "server"
    cfg = server_cfg(tmp_path, "federation.num_rounds=2")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, json.dumps(cfg.to_dict()), str(server / "round_2.pt")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    leftover = list(server.glob(".round_2.pt.*.tmp"))  # SIGKILL cannot be caught: the temporary file stays
    assert len(leftover) == 1 and leftover[0].stat().st_size > 0, sorted(p.name for p in server.iterdir())

    task = get_task("pretraining")
    listed = [rnd for rnd, _ in ServerCheckpoints(cfg, task).rounds()]
    assert [rnd for rnd, _ in round_files(server)] == listed == [0, 1]
    assert check_resume(absolutize_paths(cfg), task, {}) == (1, server / "round_1.pt")
    result = run(cfg, resume=True)
    assert [r["round"] for r in result["history"]] == [0, 1, 2]
    assert [rnd for rnd, _ in round_files(server)] == [0, 1, 2]
    assert leftover[0].exists()  # never listed, never deleted: fileio.py says it is safe to remove
