"""Where a deployment's paths point: the SuperNode's node config (data-path, checkpoint-path, teacher-path)
and the ServerApp's run config (config and the path keys), with ``~`` the home of the machine that reads
them and relative paths against the folder its daemon was started in; and where a SuperNode keeps its
heads when its node config does not say (its own data folder, never the server's checkpoint folder)."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO
from fedhubert.federation.server_app import config_from_run_config
from fedhubert.federation.task import absolutize_paths, client_checkpoint_dir, client_data_dir, node_heads_dir
from fedhubert.federation.tasks import teacher_file, teacher_head_dir


def test_node_config_paths_expand_home_and_resolve_against_the_supernodes_folder(tmp_path, monkeypatch):
    home, started_in = tmp_path / "home", tmp_path / "where-supernode-started"
    started_in.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(started_in)
    cfg = config_from_run_config({"config": str(REPO / "configs" / "pretraining_config.yaml")})
    assert client_data_dir(cfg, 0, {"data-path": "~/client"}) == home / "client"
    assert client_data_dir(cfg, 0, {"data-path": "client"}) == started_in / "client"
    node = {"partition-id": 1, "data-path": "~/client", "teacher-path": "~/teacher.pt"}
    (home).mkdir()
    (home / "teacher.pt").write_bytes(b"")
    assert teacher_file(cfg, node) == home / "teacher.pt"


def test_a_supernodes_heads_default_to_its_data_folder_not_the_servers_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    server_ckpt = "/srv/on-another-machine/checkpoints"
    # a SuperNode with a data-path and no checkpoint-path: <data-path>/heads, for pretraining and distillation alike
    node = {"partition-id": 0, "data-path": "~/client"}
    assert client_checkpoint_dir(server_ckpt, 0, node) == tmp_path / "client" / "heads"
    cfg = config_from_run_config({"config": str(REPO / "configs" / "distillation_config.yaml")})
    assert teacher_head_dir(cfg, 0, node) == tmp_path / "client" / "heads"
    # an explicit checkpoint-path wins
    node["checkpoint-path"] = "~/elsewhere"
    assert client_checkpoint_dir(server_ckpt, 0, node) == tmp_path / "elsewhere" == node_heads_dir(node)
    # a simulation (no data-path): the run's clients/ folder
    assert client_checkpoint_dir(server_ckpt, 3, {"partition-id": 3}) == Path(server_ckpt) / "clients" / "client_3"
    assert node_heads_dir({"partition-id": 3}) is None


def test_the_run_configs_paths_are_the_superlink_machines(tmp_path, monkeypatch):
    """`flwr run --run-config 'config="~/experiment.yaml" overrides="federation.checkpoint_dir=~/ckpt ..."'`: the
    ServerApp reads ~ as its own machine's home and relative paths against the folder flower-superlink runs in."""
    home, started_in = tmp_path / "server-home", tmp_path / "superlink-folder"
    home.mkdir()
    started_in.mkdir()
    (home / "experiment.yaml").write_text(f"extends: {REPO / 'configs' / 'demo.yaml'}\nfederation:\n  num_rounds: 5\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(started_in)
    cfg = config_from_run_config({"config": "~/experiment.yaml",
                                  "overrides": "federation.checkpoint_dir=~/run/ckpt data.partitions_dir=labels"})
    assert cfg.federation.num_rounds == 5  # the file under ~ was read
    cfg = absolutize_paths(cfg)
    assert cfg.federation.checkpoint_dir == str(home / "run" / "ckpt")
    assert cfg.data.partitions_dir == str(started_in / "labels")
