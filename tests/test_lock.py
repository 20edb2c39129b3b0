"""requirements.lock: the environment the tests run in matches the lock (every package requirements.txt
pulls in, at its locked version), and the checker reports each kind of difference in one line."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lock():
    spec = importlib.util.spec_from_file_location("lock_requirements", REPO / "scripts" / "lock_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_environment_matches_the_lock(lock) -> None:
    lines = lock.differences()
    assert not lines, ("the environment differs from requirements.lock (re-run scripts/setup_env.sh, or after a "
                       "verified upgrade: .venv/bin/python scripts/lock_requirements.py):\n" + "\n".join(lines))


def test_the_lock_pins_the_stack_and_every_dependency(lock) -> None:
    pins, tag = lock.read_lock(REPO / "requirements.lock")
    assert tag  # the platform its closure was resolved on
    for direct in ("torch", "torchaudio", "flwr", "s3prl", "transformers", "huggingface-hub"):
        assert direct in pins
    for floating in ("numpy", "scikit-learn", "pandas", "soundfile", "matplotlib", "scipy", "grpcio", "ray"):
        assert floating in pins  # the ones requirements.txt leaves open, and their dependencies
    assert "pip" not in pins and "fedhubert" not in pins


def test_each_difference_is_one_line(lock, tmp_path: Path) -> None:
    pins, _ = lock.read_lock(REPO / "requirements.lock")
    found, problems = lock.closure(lock.read_requirements(REPO / "requirements.txt"), lock.installed())
    assert not problems and set(found) <= set(pins) | {"fedhubert"}
    stale = dict(found)
    stale["numpy"] = "0.0.1"  # another version
    del stale["pandas"]  # pulled in but unlocked
    stale["not-a-real-package"] = "1.0"  # locked but pulled in by nothing
    (tmp_path / "requirements.lock").write_text(lock.render(stale))
    lines = lock.differences(tmp_path / "requirements.lock")
    assert len(lines) == 3, lines
    assert any(l.startswith("numpy: ") and "pins 0.0.1" in l for l in lines)
    assert any(l.startswith("pandas: ") and "not in requirements.lock" in l for l in lines)
    assert any(l.startswith("not-a-real-package: ") and "nothing in requirements.txt" in l for l in lines)
    # A requirement the environment lacks is named too, and a malformed pin stops with its line number.
    (tmp_path / "requirements.txt").write_text("numpy\nnot-installed-anywhere==1.0\n")
    assert any("not-installed-anywhere: required by requirements.txt but not installed" in l
               for l in lock.differences(REPO / "requirements.lock", tmp_path / "requirements.txt"))
    (tmp_path / "bad.lock").write_text("numpy>=1\n")
    with pytest.raises(SystemExit, match=r"bad.lock:1: not a 'name==version' pin"):
        lock.read_lock(tmp_path / "bad.lock")
