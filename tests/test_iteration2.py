"""HuBERT's second iteration: k-means on a pretrained model's own layer (kmeans.features=hubert,
features.HubertFeatures through features.make_features), targets.json, kmeans.percent, and a pretraining
that starts from a checkpoint's encoder (federation.init_checkpoint) with a fresh head."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

from conftest import REPO, TINY, fed_config, make_config, teacher_path
from fedhubert import targets as targets_module
from fedhubert.audio import load_audio
from fedhubert.checkpoint import load_checkpoint, save_checkpoint
from fedhubert.config import load_config, num_frames
from fedhubert.data import read_manifest
from fedhubert.errors import ConfigError, DataError
from fedhubert.federation.task import build_model, is_head_param
from fedhubert.federation.tasks import FederatedTask, init_from_checkpoint
from fedhubert.partition import SPLITS
from fedhubert.features import HubertFeatures, default_layer, make_features
from fedhubert.targets import fitting_utterances, generate_targets, read_targets


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def copy_parts(federated_partitions, dest: Path) -> tuple[Path, Path]:
    root, shared = federated_partitions
    shutil.copytree(shared, dest)
    return root, dest


def hubert_config(parts: tuple[Path, Path], checkpoint: Path, *overrides: str):
    return make_config(*parts, *TINY, "kmeans.features=hubert", f"kmeans.checkpoint={checkpoint}", *overrides)


@pytest.fixture(scope="module")
def iteration2(federated_partitions, tiny_pretraining, tmp_path_factory):
    """(config, infos, partitions) of iteration-2 targets: per-client k-means on the default layer of the
    tiny pretraining's best model, on a copy of the shared partitions."""
    parts = copy_parts(federated_partitions, tmp_path_factory.mktemp("it2") / "partitions")
    cfg = hubert_config(parts, teacher_path(tiny_pretraining))
    return cfg, generate_targets(cfg), parts[1]


def test_iteration2_labels_every_frame_and_records_what_made_them(iteration2, tiny_pretraining):
    cfg, infos, out = iteration2
    best = teacher_path(tiny_pretraining)
    # iteration 1's pretraining recorded its (MFCC) targets in its checkpoints: that is where "2" comes from
    _, _, extras = load_checkpoint(best)
    assert extras["targets"]["features"] == "mfcc" and extras["targets"]["iteration"] == 1

    record = json.loads((out / "targets.json").read_text())
    assert record == read_targets(out)
    assert (record["features"], record["iteration"], record["layer"], record["codebook"]) == ("hubert", 2, 1, "local")
    assert record["checkpoint"] == str(best.resolve()) and record["checkpoint_sha1"] == sha1(best)
    assert record["feature_dim"] == 32 == tiny_pretraining[0].model.hidden_size  # not MFCC's 39
    assert record["clusters"] == {str(i["client"]): i["n_clusters"] for i in infos} and len(infos) == 3

    features = make_features(cfg)
    for info in infos:
        d = out / f"client_{info['client']}"
        km = joblib.load(d / "kmeans.joblib")
        assert km.cluster_centers_.shape == (info["n_clusters"], 32)
        for split in SPLITS:
            root, paths, sizes = read_manifest(d / f"{split}.tsv")
            lines = (d / f"{split}.km").read_text().splitlines()
            assert len(lines) == len(paths) > 0
            for line, size in zip(lines, sizes):
                ids = np.array(line.split(), dtype=np.int64)
                assert len(ids) == num_frames(size) and 0 <= ids.min() and ids.max() < info["n_clusters"]
        # the first train line is the k-means of this model's layer-1 features of that utterance
        root, paths, _ = read_manifest(d / "train.tsv")
        first = np.array((d / "train.km").read_text().splitlines()[0].split(), dtype=np.int64)
        np.testing.assert_array_equal(first, km.predict(features(load_audio(root / paths[0], 16000))))


def test_layer_and_checkpoint_errors_are_one_line_and_write_nothing(iteration2, tiny_pretraining, tmp_path):
    cfg, _, out = iteration2
    parts = (Path(cfg.data.librispeech_root), out)
    before = {p: sha1(p) for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(ConfigError) as err:  # the tiny model has one transformer layer
        generate_targets(hubert_config(parts, teacher_path(tiny_pretraining), "kmeans.layer=2"))
    assert "kmeans.layer" in str(err.value) and "1 transformer layers" in str(err.value)
    assert "\n" not in str(err.value)
    missing = tmp_path / "no_such_model.pt"
    with pytest.raises(DataError) as err:
        generate_targets(hubert_config(parts, missing))
    assert str(missing) in str(err.value) and "kmeans.checkpoint" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="kmeans.checkpoint: .*junk.pt"):
        generate_targets(hubert_config(parts, tmp_path / "junk.pt"))
    with pytest.raises(ConfigError, match="kmeans.checkpoint is empty"):
        make_config(*parts, *TINY, "kmeans.features=hubert")
    with pytest.raises(ConfigError, match=r"'kmeans.percent' must be in \(0, 1\]"):
        make_config(*parts, *TINY, "kmeans.percent=0")
    assert {p: sha1(p) for p in sorted(out.rglob("*")) if p.is_file()} == before
    # the script: exit status 2 and one line naming the file
    done = subprocess.run([sys.executable, "generate_kmeans_targets.py", "--set", f"data.partitions_dir={out}",
                           "--set", "kmeans.features=hubert", "--set", f"kmeans.checkpoint={missing}", "--set",
                           "partition.num_clients=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and str(missing) in lines[0], done.stderr


def test_hubert_features_are_the_models_layer(federated_partitions, tiny_pretraining, tmp_path):
    root, parts = federated_partitions
    _, paths, sizes = read_manifest(parts / "client_0" / "train.tsv")
    wav = load_audio(root / paths[0], 16000)
    best = teacher_path(tiny_pretraining)
    model, _, _ = load_checkpoint(best)
    with torch.inference_mode():
        hidden, _ = model.eval().extract_hidden_states(wav[None])
    features = HubertFeatures(hubert_config((root, parts), best, "training.device=cpu"))
    out = features(wav)
    assert out.dtype == np.float32 and out.shape == (num_frames(sizes[0]), 32)
    torch.testing.assert_close(torch.from_numpy(out), hidden[1][0], rtol=0, atol=0)

    # a deeper pre-norm model, whose targets were iteration 2: layers cut above L give hidden[L] exactly
    cfg = load_config(None, ["model.hidden_size=32", "model.num_hidden_layers=3", "model.num_attention_heads=2",
                             "model.intermediate_size=64", "model.conv_dim=32", "model.final_dim=16",
                             "model.layer_norm_first=true"])
    deep = build_model(cfg).eval()
    save_checkpoint(tmp_path / "deep.pt", deep, cfg, targets={"iteration": 2, "features": "hubert"})
    with torch.inference_mode():
        hidden, _ = deep.extract_hidden_states(wav[None])
    for layer in (0, 1, 3):
        f = HubertFeatures(hubert_config((root, parts), tmp_path / "deep.pt", f"kmeans.layer={layer}",
                                         "training.device=cpu"))
        assert f.layer == (layer or default_layer(3)) == (layer or 2) and f.iteration == 3
        torch.testing.assert_close(torch.from_numpy(f(wav)), hidden[f.layer][0], rtol=0, atol=0)
    chunked = HubertFeatures(hubert_config((root, parts), tmp_path / "deep.pt", "training.device=cpu"), chunk_frames=50)
    assert chunked(wav).shape == (num_frames(len(wav)), 32) and num_frames(len(wav)) > 100  # 3+ pieces
    assert chunked(wav[:400 + 320 * 49 + 319]).shape == (50, 32)  # exactly one piece
    assert chunked(wav[:399]).shape == (0, 32)


def test_pretraining_starts_from_the_checkpoints_encoder_with_a_fresh_head(federated_partitions, tiny_pretraining,
                                                                            tmp_path):
    best = teacher_path(tiny_pretraining)
    _, _, extras = load_checkpoint(best)
    source = torch.load(best, weights_only=True)["model_weight"]
    cfg = fed_config(federated_partitions, tmp_path / "ckpt", f"federation.init_checkpoint={best}")
    task = FederatedTask()
    task.preflight(cfg)
    model, record = task.initial_model(cfg, task.check_label_space(cfg))
    seeded = build_model(fed_config(federated_partitions, tmp_path / "ckpt")).state_dict()
    state = model.state_dict()
    encoder = [k for k in state if not is_head_param(k)]
    assert encoder and all(torch.equal(state[k], source[k]) for k in encoder)
    assert not torch.equal(state["encoder.layers.0.fc1.weight"], seeded["encoder.layers.0.fc1.weight"])
    for k in ("final_proj.weight", "final_proj.bias", "label_embs_concat"):  # a new label space: the seeded head
        assert torch.equal(state[k], seeded[k])
    assert record == {"init_checkpoint": str(best), "init_checkpoint_sha1": sha1(best), "init_head": "fresh"}
    # empty = the seeded random init, exactly as before
    plain, none = task.initial_model(fed_config(federated_partitions, tmp_path / "ckpt"), {})
    assert none == {} and all(torch.equal(v, seeded[k]) for k, v in plain.state_dict().items())

    # a federated head on the same codebook is kept; on another codebook (or K) it is fresh
    fed = fed_config(federated_partitions, tmp_path / "ckpt", "kmeans.codebook=federated")
    trained = build_model(fed)
    with torch.no_grad():
        trained.label_embs_concat.add_(1.0)
    save_checkpoint(tmp_path / "fed.pt", trained, fed, codebook_sha1="a" * 40)
    fed.federation.init_checkpoint = str(tmp_path / "fed.pt")
    kept, record = init_from_checkpoint(fed, "a" * 40)
    assert record["init_head"] == "checkpoint" and torch.equal(kept.label_embs_concat, trained.label_embs_concat)
    fresh, record = init_from_checkpoint(fed, "b" * 40)
    assert record["init_head"] == "fresh" and torch.equal(fresh.label_embs_concat, build_model(fed).label_embs_concat)

    with pytest.raises(DataError, match=r"federation.init_checkpoint not found: .*gone.pt"):
        task.preflight(fed_config(federated_partitions, tmp_path / "ckpt",
                                  f"federation.init_checkpoint={tmp_path / 'gone.pt'}"))
    with pytest.raises(ConfigError, match=r"federation.init_checkpoint .*model.hidden_size 32 \(config: 64\)"):
        init_from_checkpoint(fed_config(federated_partitions, tmp_path / "ckpt", f"federation.init_checkpoint={best}",
                                        "model.hidden_size=64"))
    assert extras["round"] >= 1  # a trained model, not the seeded one: the encoder check above means something


def test_percent_fits_on_a_share_of_the_utterances_and_labels_every_frame(federated_partitions, tmp_path,
                                                                         monkeypatch):
    parts = copy_parts(federated_partitions, tmp_path / "partitions")
    cfg = make_config(*parts, *TINY, "kmeans.percent=0.5")
    fitted = []  # frames each pass of each client's fit went through

    def counting_fit(passes, dim, n_clusters, chunk, num_passes, seed):
        def counted(p):
            feats = list(passes(p))
            fitted.append(sum(len(f) for f in feats))
            return iter(feats)
        return fit_kmeans(counted, dim, n_clusters, chunk, num_passes, seed)

    fit_kmeans = targets_module.fit_kmeans
    monkeypatch.setattr(targets_module, "fit_kmeans", counting_fit)
    infos = generate_targets(cfg)
    assert fitted == [i["fit_frames"] for i in infos for _ in range(cfg.kmeans.fit_passes)]
    for info in infos:
        assert info["fit_utterances"] < info["train_utterances"] and info["fit_frames"] < info["train_frames"]
        assert info["fit_frames"] >= math.ceil(0.5 * info["train_frames"])
        d = parts[1] / f"client_{info['client']}"
        for split in SPLITS:
            _, _, sizes = read_manifest(d / f"{split}.tsv")
            lines = (d / f"{split}.km").read_text().splitlines()
            assert [len(line.split()) for line in lines] == [num_frames(s) for s in sizes]
    assert read_targets(parts[1])["percent"] == 0.5

    sizes = [16000 * (i + 1) for i in range(10)]
    picked = fitting_utterances(cfg, sizes, 0)
    assert list(picked) == list(fitting_utterances(cfg, sizes, 0)) and list(picked) != list(fitting_utterances(cfg, sizes, 1))
    frames = [num_frames(s) for s in sizes]
    got = sum(frames[i] for i in picked)
    assert got >= math.ceil(0.5 * sum(frames)) and got - min(frames[i] for i in picked) < math.ceil(0.5 * sum(frames))
    assert list(fitting_utterances(make_config(*parts, *TINY), sizes, 0)) == list(range(10))


def test_federated_kmeans_on_hubert_features_with_percent(federated_partitions, tiny_pretraining, tmp_path):
    """The one simulation of this file: federated k-means (kmeans_app.py) on the model's layer, fitted on
    half of every client's utterances; every client still labels every frame with the codebook."""
    from fedhubert import fedkmeans
    from fedhubert.targets import SplitFrames

    parts = copy_parts(federated_partitions, tmp_path / "partitions")
    best = teacher_path(tiny_pretraining)
    cfg = hubert_config(parts, best, "kmeans.codebook=federated", "kmeans.max_rounds=2", "kmeans.tol=0",
                        "kmeans.percent=0.5", "training.device=cpu")
    infos = generate_targets(cfg)
    out = parts[1]
    codebook = np.load(out / "codebook.npy")
    assert codebook.shape[1] == 32 and len(infos) == 3
    record = read_targets(out)
    assert (record["features"], record["iteration"], record["codebook"], record["percent"]) == ("hubert", 2, "federated", 0.5)
    assert record["checkpoint_sha1"] == sha1(best) and record["codebook_sha1"] == sha1(out / "codebook.npy")
    rounds = [json.loads(line) for line in (out / "kmeans_metrics.jsonl").read_text().splitlines()]
    train_frames = sum(i["train_frames"] for i in infos)
    assert rounds[0]["fit_frames"] == rounds[1]["num_frames"] < train_frames
    features = make_features(cfg)
    for info in infos:
        d = out / f"client_{info['client']}"
        assert not (d / "kmeans.joblib").exists()
        frames = SplitFrames(d / "valid.tsv", features, 16000)
        lines = (d / "valid.km").read_text().splitlines()
        for i, line in enumerate(lines):
            np.testing.assert_array_equal(np.array(line.split(), dtype=np.int64),
                                          fedkmeans.assign(codebook, frames.utterance(i)))
        _, _, sizes = read_manifest(d / "train.tsv")
        assert [len(line.split()) for line in (d / "train.km").read_text().splitlines()] == [num_frames(s) for s in sizes]


def test_the_centralized_row_repeats_the_iteration_from_the_centralized_model(federated_partitions, tiny_pretraining,
                                                                            tmp_path):
    """An iteration-2 run's centralized row clusters the pooled frames in iteration 1's *centralized*
    model's features and starts from its encoder (evaluation.centralized_init), at the new run's budget."""
    from fedhubert.centralized import federated_budget, train_centralized

    cfg1, _ = tiny_pretraining
    budget = federated_budget(Path(cfg1.federation.checkpoint_dir) / "metrics.jsonl")
    first, _ = train_centralized(cfg1, tmp_path / "it1", budget)
    best = teacher_path(tiny_pretraining)
    next_run = ("kmeans.features=hubert", f"kmeans.checkpoint={best}", f"federation.init_checkpoint={best}")
    cfg2 = fed_config(federated_partitions, tmp_path / "ckpt", *next_run, f"evaluation.centralized_init={first}")
    second, info = train_centralized(cfg2, tmp_path / "it2", budget)
    _, saved_cfg, _ = load_checkpoint(second)
    assert saved_cfg.kmeans.checkpoint == str(first) and saved_cfg.federation.init_checkpoint == str(first)
    pooled = joblib.load(tmp_path / "it2" / "partitions" / "client_0" / "kmeans.joblib")
    assert pooled.cluster_centers_.shape[1] == cfg2.model.hidden_size  # the model's features, not 39-d MFCC
    assert info["examples"] > 0 and info["curve"][0]["examples"] == 0
    # iteration 1's centralized row is unchanged: MFCC targets, the seeded model
    assert joblib.load(tmp_path / "it1" / "partitions" / "client_0" / "kmeans.joblib").cluster_centers_.shape[1] == 39
    # a new centralized_init (another file) is a new model, not the cached one
    moved = tmp_path / "it1_copy.pt"
    save_checkpoint(moved, build_model(cfg1), cfg1)
    cfg2.evaluation.centralized_init = str(moved)
    again, _ = train_centralized(cfg2, tmp_path / "it2", budget)
    assert load_checkpoint(again)[1].kmeans.checkpoint == str(moved)
    with pytest.raises(ConfigError, match=r"evaluation.centralized_init is empty.*kmeans.checkpoint and "
                                          r"federation.init_checkpoint"):
        train_centralized(fed_config(federated_partitions, tmp_path / "ckpt", *next_run), tmp_path / "it3", budget)
    with pytest.raises(DataError, match=r"evaluation.centralized_init not found: .*gone.pt"):
        train_centralized(fed_config(federated_partitions, tmp_path / "ckpt", *next_run,
                                     f"evaluation.centralized_init={tmp_path / 'gone.pt'}"), tmp_path / "it3", budget)
