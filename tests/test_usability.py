"""The scripts from a user's seat: every script's --help and --help-config, paths relative to the folder a
command runs in (setup_env.sh changes no folder), and the repository's licence, requirements and README
wording."""

from __future__ import annotations

import hashlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedhubert.config import describe_keys

REPO = Path(__file__).resolve().parent.parent
# script -> extra arguments it needs besides the one under test (a required --out)
CONFIG_SCRIPTS = {"partition_data.py": [], "generate_kmeans_targets.py": [], "federated_hubert_pretraining.py": [],
                  "federated_distillation.py": [], "evaluate.py": [], "check_s3prl_load.py": [],
                  "scripts/sweep_federation.py": ["--out", "sweep"], "scripts/compare_label_spaces.py": ["--out", "cmp"],
                  "prepare_client.py": ["--audio", "audio", "--out", "client"]}
# script -> an option its --help must list
OTHER_SCRIPTS = {"export_huggingface.py": "folder", "make_speech_commands.py": "--train-voices",
                 "run_s3prl_downstream.py": "--upstream", "scripts/make_scale_corpus.py": "--speakers"}


def run_script(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Runs a top-level script in this process as ``python <script> <argv>`` would; its exit status."""
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *argv])
    monkeypatch.setattr(sys, "path", [str((REPO / script).parent), *sys.path])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return stopped.value.code or 0


@pytest.mark.parametrize("script, flag", [*((s, f) for f in ("--help", "--help-config") for s in CONFIG_SCRIPTS),
                                          *((s, "--help") for s in OTHER_SCRIPTS)])  # those take no config
def test_help_and_help_config_work_for_every_script(script, flag, monkeypatch, capsys):
    assert run_script(script, [flag], monkeypatch) == 0
    out = capsys.readouterr().out
    if flag == "--help":
        assert out.startswith("usage:"), out[:200]
        for option in (["--config", "--set", "--help-config"] if script in CONFIG_SCRIPTS else [OTHER_SCRIPTS[script]]):
            assert option in out, f"{script} --help does not list {option}"
        return
    for key, type_name, default, meaning, valid in describe_keys():
        assert f"{key} ({type_name}; default {default!r}{'; ' + valid if valid else ''})" in out, key
        assert meaning in out, key
    assert "; [0.0, 1.0])" in out and "one of speaker_based, iid, dirichlet" in out  # ranges and choices shown


@pytest.mark.parametrize("script", CONFIG_SCRIPTS)
def test_a_relative_config_is_found_from_the_callers_folder(script, tmp_path, monkeypatch, capsys):
    (tmp_path / "my.yaml").write_text("nosuchsection:\n  key: 1\n")
    monkeypatch.chdir(tmp_path)
    assert run_script(script, ["--config", "my.yaml", *CONFIG_SCRIPTS[script]], monkeypatch) == 2
    assert f"unknown config key 'nosuchsection' in {tmp_path / 'my.yaml'}" in capsys.readouterr().err
    # without --config: the repository's own config, from any folder
    assert run_script(script, ["--set", "nosuchsection.key=1", *CONFIG_SCRIPTS[script]], monkeypatch) == 2
    assert "unknown config key 'nosuchsection' in --set" in capsys.readouterr().err


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The shell scripts in a copy of the repository whose .venv is current (its python: this one), so that
    setup_env.sh installs nothing; the Python code and configs are links to the real ones."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("scripts/setup_env.sh", "run_pretraining.sh", "run_distillation.sh", "run_demo.sh", "requirements.txt",
                 "requirements.lock"):
        shutil.copy(REPO / name, root / name)
    for name in ("fedhubert", "configs", "federated_hubert_pretraining.py", "federated_distillation.py",
                 "partition_data.py"):
        (root / name).symlink_to(REPO / name)
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stamp = hashlib.sha256((root / "requirements.txt").read_bytes() + (root / "requirements.lock").read_bytes())
    (root / ".venv" / ".requirements.sha256").write_text(stamp.hexdigest() + "\n")
    return root


def test_setup_env_reinstalls_when_the_lock_changes(repo_copy, tmp_path):
    """The stamp covers requirements.lock too: a new pin re-installs (here the install stops at once: python3 is
    a stand-in that fails, so nothing is installed anywhere)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho \"python3 $*\" >&2\nexit 1\n")
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}

    def source() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", 'source "$1/scripts/setup_env.sh"', "bash", str(repo_copy)], env=env,
                              capture_output=True, text=True, timeout=60)

    current = source()
    assert current.returncode == 0 and "installing" not in current.stdout + current.stderr
    stamp = (repo_copy / ".venv" / ".requirements.sha256").read_text()
    with (repo_copy / "requirements.lock").open("a") as f:
        f.write("numpy==0.0.1\n")
    changed = source()
    assert changed.returncode == 1 and "setup: installing the Python stack" in changed.stdout
    assert "python3 -m venv" in changed.stderr and "setup: failed" in changed.stderr
    assert (repo_copy / ".venv" / ".requirements.sha256").read_text() == stamp  # so the next run tries again


def test_setup_env_keeps_the_folder_and_shell_scripts_take_relative_configs(repo_copy, tmp_path):
    work = tmp_path / "experiment"
    work.mkdir()
    (work / "my.yaml").write_text("nosuchsection:\n  key: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def bash(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command, "bash", str(repo_copy)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)

    sourced = bash('source "$1/scripts/setup_env.sh" && pwd && echo "$PATH"')
    assert sourced.returncode == 0, sourced.stderr
    folder, path = sourced.stdout.splitlines()[-2:]
    assert folder == str(work)
    assert path.startswith(f"{repo_copy}/.venv/bin:")
    for script in ("run_pretraining.sh", "run_distillation.sh"):
        found = bash(f'"$1/{script}" --config my.yaml')
        assert found.returncode == 2, found.stderr
        assert f"unknown config key 'nosuchsection' in {work / 'my.yaml'}" in found.stderr
        helped = bash(f'"$1/{script}" --help')
        assert helped.returncode == 0 and "--resume" in helped.stdout and "--help-config" in helped.stdout
    demo = bash('"$1/run_demo.sh" --help')
    assert demo.returncode == 0 and "CONFIG" in demo.stdout and "set -euo" not in demo.stdout
    keys = bash('"$1/run_demo.sh" --help-config')
    assert keys.returncode == 0 and "data.librispeech_root (str; default 'corpus/LibriSpeech')" in keys.stdout


def test_the_declared_licence_is_there():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # the bundled corpus keeps its own licence, with its attribution
    assert "Creative Commons Attribution 4.0" in " ".join((REPO / "corpus" / "README.md").read_text().split())
    assert "Attribution 4.0" in (REPO / "corpus" / "LibriSpeech" / "LICENSE.TXT").read_text()


def test_requirements_refer_to_nothing_outside_the_repository():
    for number, line in enumerate((REPO / "requirements.txt").read_text().splitlines(), 1):
        code, _, comment = line.partition("#")
        if code.strip():  # a plain requirement: no -r/-c/-e, path or URL
            assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[[A-Za-z0-9_,.-]+\])?\s*((==|>=|<=|~=|<|>)\s*[A-Za-z0-9_.*+!-]+)?",
                                code.strip()), f"requirements.txt:{number}: {line}"
        for named in re.findall(r"[\w./-]+\.(?:md|txt|py|sh|yaml)\b", comment):
            assert (REPO / named).exists(), f"requirements.txt:{number} names {named}, not in the repository"


def test_the_readme_has_no_project_management_wording():
    readme = (REPO / "README.md").read_text()
    for pattern in (r"\bissues?\b", r"\bsessions?\b", r"\btracker\b", r"\blater (?:issue|session|PR)\b",
                    r"\bTODO\b", r"\bhelpers?\b"):
        found = [line for line in readme.splitlines() if re.search(pattern, line, re.IGNORECASE)]
        assert not found, f"README.md: {pattern}: {found[0]}"


def test_the_sweep_runs_the_scripts_in_the_callers_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import sweep_federation

    (tmp_path / "my.yaml").write_text("nosuchsection:\n  key: 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="partition_data.py failed"):
        sweep_federation.run(["partition_data.py", "--config", "my.yaml"], tmp_path / "sweep.log")
    assert f"unknown config key 'nosuchsection' in {tmp_path / 'my.yaml'}" in (tmp_path / "sweep.log").read_text()
