"""The config loader (fedhubert/config.py) and the scripts' one-line config errors."""

from __future__ import annotations

import re
from pathlib import Path
import subprocess
import sys

import pytest
import yaml

from conftest import BASE_CONFIG, REPO
from fedhubert.config import Config, config_from_dict, describe_keys, load_config, parse_override
from fedhubert.errors import ConfigError


def load(*overrides: str) -> Config:
    return load_config(BASE_CONFIG, list(overrides))


@pytest.mark.parametrize("override, key", [
    ("data.no_such_key=1", "data.no_such_key"),
    ("nosection.key=1", "nosection"),
    ("model.hidden_size.deep=1", "model.hidden_size"),
])
def test_unknown_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load(override)


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition:\n  num_clientz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "partition.num_clientz" in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize("override, key, words", [
    ("model.hidden_size=abc", "model.hidden_size", "integer"),
    ("model.hidden_size=1.5", "model.hidden_size", "integer"),
    ("kmeans.use_deltas=maybe", "kmeans.use_deltas", "true or false"),
    ("kmeans.use_deltas=1", "kmeans.use_deltas", "true or false"),
    ("data.subsets=train-clean-100", "data.subsets", "list"),
    ("data.subsets=[1]", "data.subsets[0]", "string"),
    ("training.learning_rate=fast", "training.learning_rate", "number"),
    ("training.batch_size=huge", "training.batch_size", "auto"),
    ("partition.method=by_book", "partition.method", "speaker_based"),
    ("data=3", "data", "mapping"),
])
def test_wrong_types_are_named(override, key, words):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert f"'{key}'" in str(err.value) or key in str(err.value)
    assert words in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("data.mask_prob=1.5", "data.mask_prob"),
    ("partition.num_clients=0", "partition.num_clients"),
    ("partition.valid_fraction=0.95", "partition.valid_fraction"),
    ("data.scan_workers=0", "data.scan_workers"),
    ("data.sample_rate=4000", "data.sample_rate"),
    ("kmeans.n_clusters=1", "kmeans.n_clusters"),
    ("training.batch_size=0", "training.batch_size"),
])
def test_out_of_range_values_are_named(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        load(override)
    assert "must be" in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["model.hidden_size=100", "model.num_attention_heads=12"], "model.num_attention_heads"),
    (["kmeans.n_clusters=600"], "model.vocab_size"),
    (["model.conv_pos_groups=7"], "model.conv_pos_groups"),
    (["partition.num_clients=1"], "federation.min_fit_clients"),
    (["data.min_audio_length=50000"], "data.min_audio_length"),
])
def test_cross_key_checks(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load(*overrides)


def test_valid_overrides_are_typed():
    cfg = load("partition.num_clients=5", "data.subsets=[train-clean-100, dev-clean]",
               "training.learning_rate=5e-4", "kmeans.use_deltas=false", "training.batch_size=auto",
               "data.mask_prob=1", "seed=7", "data.partitions_dir=/tmp/some where")
    assert cfg.partition.num_clients == 5 and cfg.seed == 7
    assert cfg.data.subsets == ["train-clean-100", "dev-clean"]
    assert cfg.training.learning_rate == 5e-4 and isinstance(cfg.data.mask_prob, float)
    assert cfg.kmeans.use_deltas is False and cfg.training.batch_size == "auto"
    assert cfg.data.partitions_dir == "/tmp/some where"
    assert load("training.batch_size=16").training.batch_size == 16


def test_override_parsing():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert parse_override("x=a=b") == {"x": "a=b"}
    assert parse_override("x=") == {"x": ""}
    for bad in ("novalue", "a..b=1", ".a=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)


def test_extends_layers_and_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\npartition:\n  num_clients: 4\n  method: iid\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\npartition:\n  num_clients: 5\n")
    cfg = load_config(tmp_path / "child.yaml", ["seed=9"])
    assert (cfg.seed, cfg.partition.num_clients, cfg.partition.method) == (9, 5, "iid")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "broken.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


DISTILLATION_CONFIG = REPO / "configs" / "distillation_config.yaml"


def _yaml_keys_and_comments(path: Path = BASE_CONFIG) -> dict[str, str | None]:
    """Every ``section.key`` of a config file with its trailing comment."""
    found, section = {}, None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line.startswith("extends:"):
            continue
        m = re.match(r"^( *)(\w+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        assert m, f"unexpected line in {path.name}: {line!r}"
        indent, name, value, comment = m.groups()
        if not indent and not value:
            section = name
        else:
            found[f"{section}.{name}" if indent else name] = comment
    return found


def test_pretraining_config_lists_every_key_with_its_meaning():
    described = {key: meaning for key, _, _, meaning, _ in describe_keys() if not key.startswith("distillation.")}
    in_yaml = _yaml_keys_and_comments()
    assert set(in_yaml) == set(described)
    assert {k: c for k, c in in_yaml.items() if c != described[k]} == {}
    doc = yaml.safe_load(BASE_CONFIG.read_text())
    flat = {f"{s}.{k}" for s, v in doc.items() if isinstance(v, dict) for k in v}
    flat |= {s for s, v in doc.items() if not isinstance(v, dict)}
    assert flat == set(described)  # the line parser above agrees with YAML
    load_config(BASE_CONFIG)


def test_distillation_config_lists_every_distillation_key_with_its_default_and_meaning():
    rows = {key: (default, meaning) for key, _, default, meaning, _ in describe_keys() if key.startswith("distillation.")}
    in_yaml = _yaml_keys_and_comments(DISTILLATION_CONFIG)
    assert in_yaml == {key: meaning for key, (_, meaning) in rows.items()}
    doc = yaml.safe_load(DISTILLATION_CONFIG.read_text())
    assert doc["extends"] == "pretraining_config.yaml" and set(doc) == {"extends", "distillation"}
    assert {f"distillation.{k}": v for k, v in doc["distillation"].items()} == {k: d for k, (d, _) in rows.items()}
    cfg = load_config(DISTILLATION_CONFIG)
    assert cfg.distillation.teacher_model_path == "checkpoints/pretraining/server/best_global_model.pt"
    load_config(REPO / "configs" / "demo_distillation.yaml")


@pytest.mark.parametrize("override, message", [
    ("distillation.teacher_frozen=false", "teacher_frozen"),
    ("distillation.losses=[logits,attention]", "distillation.losses[1]' must be one of logits, hidden"),
    ("distillation.losses=[]", "distillation.losses must name"),
    ("distillation.student_num_attention_heads=5", "student_num_attention_heads (5) must divide"),
    ("distillation.target_layers=[0]", "1-based"),
    ("distillation.alpha=1.5", "distillation.alpha"),
])
def test_distillation_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(override)


def test_demo_config_loads_and_extends_the_base():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    base = load_config(BASE_CONFIG)
    assert cfg.data.subsets == ["test-other"] and cfg.kmeans.n_clusters == 100
    assert cfg.model.vocab_size == base.model.vocab_size and cfg.seed == base.seed


def test_round_trip_through_dict():
    cfg = load("partition.num_clients=4", "kmeans.n_clusters=50")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()


@pytest.mark.parametrize("script", ["partition_data.py", "generate_kmeans_targets.py"])
def test_scripts_report_a_bad_key_in_one_line(script, tmp_path):
    done = subprocess.run([sys.executable, script, "--set", "partition.num_clients=0",
                           "--set", f"data.partitions_dir={tmp_path / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "partition.num_clients" in lines[0]
    assert not (tmp_path / "out").exists()


def test_script_reports_a_missing_config_file(tmp_path):
    done = subprocess.run([sys.executable, "partition_data.py", "--config", str(tmp_path / "none.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(tmp_path / "none.yaml") in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_readme_documents_every_config_key():
    from fedhubert.config import describe_keys

    readme = (REPO / "README.md").read_text()
    missing = [key for key, *_ in describe_keys() if f"`{key}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"
