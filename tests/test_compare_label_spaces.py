"""scripts/compare_label_spaces.py: its cells (what each overrides, which cell an iteration 2 continues),
that compute adds up over iterations, and that a stopped comparison resumes without re-running finished
cells (the project's scripts are replaced by a recorder writing their outputs, so this runs in a second;
the real chain is exercised by test_iteration2.py and the federated k-means tests)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("compare_label_spaces", REPO / "scripts" / "compare_label_spaces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_iteration2_continues_its_own_codebooks_iteration1(compare, tmp_path):
    plan = compare.cells(tmp_path, rounds=8)
    assert list(plan) == ["local-it1", "local-it2", "federated-it1", "federated-it2", "local-it1-2x"]
    for codebook in ("local", "federated"):
        it2 = dict(o.split("=", 1) for o in plan[f"{codebook}-it2"]["overrides"])
        best = str(tmp_path / f"{codebook}-it1" / "ckpt" / "server" / "best_global_model.pt")
        assert it2["kmeans.codebook"] == codebook and plan[f"{codebook}-it2"]["after"] == f"{codebook}-it1"
        assert it2["kmeans.checkpoint"] == best and it2["federation.init_checkpoint"] == best
        assert it2["evaluation.centralized_init"] == str(tmp_path / f"{codebook}-it1" / "eval" / "centralized" / "model.pt")
    assert "federation.num_rounds=16" in plan["local-it1-2x"]["overrides"]  # two iterations' compute in one


def fake_scripts(calls: list[list[str]]):
    """Stands in for the project's scripts: records each call and writes the evaluation it would."""
    def run(args: list[str], log: Path) -> None:
        calls.append(args)
        if args[0] != "evaluate.py":
            return
        sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
        probe = {"best_accuracy": 0.5, "weighted_accuracy": 0.4}
        rows = [{"name": n, "speaker_id": probe, "keyword": probe, "speaker_verification": {"eer": 0.2},
                 "compute_audio_hours": 0.0 if n in ("random-init", "mfcc") else 1.5,
                 "masked_prediction": None if n == "mfcc" else {"masked_accuracy": 0.1, "chance": 0.05}}
                for n in args[args.index("--rows") + 1].split(",")]
        targets = {"client_0": {"clusters_used": 90, "unit_perplexity": 60.0},
                   "client_1": {"clusters_used": 70, "unit_perplexity": 40.0},
                   "pooled (centralized)": {"clusters_used": 100, "unit_perplexity": 80.0}}
        out = Path(sets["evaluation.output_dir"])
        out.mkdir(parents=True)
        (out / "evaluation.json").write_text(json.dumps({"rows": rows, "targets": targets}))
    return run


def test_a_stopped_comparison_resumes_and_adds_up_compute(compare, tmp_path, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(compare, "run", fake_scripts(calls))
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["compare_label_spaces.py", "--out", str(out), "--only", "local-it2"])
    compare.main()
    # iteration 2 needs iteration 1: both ran, in order, each the whole chain
    chain = ["partition_data.py", "generate_kmeans_targets.py", "federated_hubert_pretraining.py", "evaluate.py"]
    assert [c[0] for c in calls] == chain * 2
    assert str(REPO / "configs" / "demo.yaml") in calls[0] and str(REPO / "configs" / "iteration2.yaml") in calls[4]
    assert calls[3][calls[3].index("--rows") + 1] == "federated,centralized,random-init,mfcc"
    assert calls[7][calls[7].index("--rows") + 1] == "federated,centralized"
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["cell"], r["row"]) for r in rows] == [("local-it1", "federated"), ("local-it1", "centralized"),
                                                     ("local-it2", "federated"), ("local-it2", "centralized")]
    assert [r["compute_hours"] for r in rows] == [1.5, 1.5, 3.0, 3.0]  # iteration 2 counts iteration 1's too
    assert rows[0]["clusters_used"] == 80 and rows[1]["clusters_used"] == 100  # clients' mean; the pooled k-means

    calls.clear()
    monkeypatch.setattr(sys, "argv", ["compare_label_spaces.py", "--out", str(out), "--only", "local,federated-it1",
                                      "--set", "federation.num_rounds=3"])
    compare.main()
    ran = [c for c in calls if c[0] == "evaluate.py"]
    rounds = [a for a in ran[1] if a.startswith("federation.num_rounds=")]
    assert rounds[-1] == "federation.num_rounds=6"  # the cell's own key wins over the --set for every cell
    assert len(ran) == 2 and any(str(out / "federated-it1") in a for a in ran[0]) and any(
        str(out / "local-it1-2x") in a for a in ran[1])  # finished cells are not run again
    table = (out / "comparison.md").read_text()
    assert "| local-it2 | federated | local | 2 | 3.00 | 50.0 / 40.0 | 20.0 |" in table
    assert "| (mfcc) |" in table and "federated-it2" not in table  # never run, never listed
    assert "| federated-it1 | centralized | pooled | 1 |" in capsys.readouterr().out
