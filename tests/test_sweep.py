"""scripts/sweep_federation.py: its grids, its --only selection, and that a stopped sweep resumes without
re-running finished configurations (the project's scripts are replaced by a recorder writing their
outputs, so this runs in a second; the real scripts are exercised by the other tests)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_federation", REPO / "scripts" / "sweep_federation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_strategies_grid_covers_the_issue(sweep):
    runs = sweep.grid("strategies", 160)
    assert runs["fedavg"] == ["federation.strategy=fedavg"]
    assert {n for n in runs if n.startswith("fedavgm-")} == {"fedavgm-lr0.1", "fedavgm-lr0.3", "fedavgm-lr1.0"}
    for strategy in ("fedadam", "fedyogi"):
        for eta in ("1e-3", "3e-3", "1e-2", "3e-2"):
            for tau in ("1e-9", "1e-3"):
                assert runs[f"{strategy}-eta{eta}-tau{tau}"] == [f"federation.strategy={strategy}",
                                                                 f"federation.eta={eta}", f"federation.tau={tau}"]
    assert len(runs) == 1 + 3 + 16


def test_the_drift_grid_keeps_the_total_local_steps(sweep):
    runs = sweep.grid("drift", 160)  # the demo: 8 rounds x 20 steps
    assert list(runs) == ["rounds2-steps80", "rounds4-steps40", "rounds8-steps20", "rounds16-steps10"]
    for overrides in runs.values():
        values = dict(o.split("=") for o in overrides)
        assert int(values["federation.num_rounds"]) * int(values["training.max_local_steps"]) == 160
    assert list(sweep.grid("drift", 20)) == ["rounds1-steps20", "rounds2-steps10"]
    with pytest.raises(SystemExit, match="max_local_steps"):
        sweep.grid("drift", 0)  # no step cap: no fixed total to split


def test_only_selects_names_and_dash_bounded_prefixes(sweep):
    assert sweep.selected("fedavgm-lr0.1", "")
    assert sweep.selected("fedavg", "fedavg") and not sweep.selected("fedavgm-lr0.1", "fedavg")
    assert sweep.selected("fedadam-eta1e-2-tau1e-9", "fedadam-eta1e-2")
    assert not sweep.selected("fedadam-eta1e-3-tau1e-9", "fedadam-eta1e-2")
    assert sweep.selected("fedyogi-eta3e-3-tau1e-3", "fedavg,fedyogi")


def fake_scripts(calls: list[list[str]]):
    """Stands in for the project's scripts: records each call and writes the files the sweep reads."""
    def run(args: list[str], log: Path) -> None:
        calls.append(args)
        sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
        if args[0] == "generate_kmeans_targets.py":
            client = Path(sets["data.partitions_dir"]) / "client_0"
            client.mkdir(parents=True)
            (client / "train.km").write_text("1 2 3\n")
        elif args[0] == "federated_hubert_pretraining.py":
            ckpt = Path(sets["federation.checkpoint_dir"])
            ckpt.mkdir(parents=True)
            rounds = [{"round": r, "val": {"loss": 9.0 - r}, "collapsed": [] if r else None} for r in range(3)]
            (ckpt / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
            (ckpt / "server").mkdir()
            (ckpt / "server" / "best_global_model.pt").write_bytes(b"")
        elif args[0] == "evaluate.py":
            names = args[args.index("--rows") + 1].split(",")
            probe = {"best_accuracy": 0.5, "weighted_accuracy": 0.4}
            rows = [{"name": n, "speaker_id": probe, "keyword": probe, "speaker_verification": {"eer": 0.2},
                     "health": {"min_effective_rank": 10.0, "max_mean_cosine": 0.5},
                     "masked_prediction": None if n == "mfcc" else {"masked_accuracy": 0.1}} for n in names]
            out = Path(sets["evaluation.output_dir"])
            out.mkdir(parents=True)
            (out / "evaluation.json").write_text(json.dumps({"rows": rows}))
    return run


def test_a_stopped_sweep_resumes_without_rerunning_finished_runs(sweep, tmp_path, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(sweep, "run", fake_scripts(calls))
    out = tmp_path / "sweep"
    argv = ["sweep_federation.py", "--config", str(REPO / "configs" / "demo.yaml"), "--grid", "drift", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "rounds4"])
    sweep.main()
    scripts = [c[0] for c in calls]
    assert scripts == ["partition_data.py", "generate_kmeans_targets.py", "federated_hubert_pretraining.py",
                       "evaluate.py", "federated_hubert_pretraining.py", "evaluate.py"]
    assert "federation.num_rounds=4" in calls[4] and "training.max_local_steps=40" in calls[4]
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == ["rounds4-steps40"]

    calls.clear()
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "rounds4,rounds16"])
    sweep.main()
    assert [c[0] for c in calls] == ["federated_hubert_pretraining.py", "evaluate.py"]  # only rounds16 is new
    assert "federation.num_rounds=16" in calls[0]
    table = (out / "sweep.md").read_text()
    assert "| rounds4-steps40 |" in table and "| rounds16-steps10 |" in table and "| (mfcc) |" in table
    assert "rounds2-steps80" not in table  # never run, never listed
    assert "| rounds16-steps10 | best | 50.0 | 40.0 | 20.0 |" in capsys.readouterr().out


def test_the_privacy_grid_runs_each_noise_multiplier_and_a_budget(sweep):
    runs = sweep.grid("privacy", 160)
    assert list(runs) == ["off", "z0.3", "z1.0", "z1.0-budget"]
    assert "privacy.enabled=false" in runs["off"]
    for name in ("z0.3", "z1.0", "z1.0-budget"):
        assert {"privacy.enabled=true", "privacy.clipping=client"} <= set(runs[name])
        assert f"privacy.noise_multiplier={name[1:4]}" in runs[name]
    assert "privacy.max_epsilon=0" in runs["z1.0"] and f"privacy.max_epsilon={sweep.PRIVACY_BUDGET}" in runs["z1.0-budget"]


def test_a_run_without_a_best_model_is_evaluated_at_its_last_round(sweep, tmp_path):
    """Every round collapsed (e.g. drowned in privacy noise): no best_global_model.pt, so the last round."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "server").mkdir(parents=True)
    (ckpt / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(5)))
    assert sweep.evaluated_round(tmp_path) == ["--round", "4"]
    (ckpt / "server" / "best_global_model.pt").write_bytes(b"")
    assert sweep.evaluated_round(tmp_path) == []
