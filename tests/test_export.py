"""Checkpoints and exports: s3prl and transformers see exactly our model; compat shims for s3prl."""

from __future__ import annotations

import fedhubert.compat  # noqa: F401  (before s3prl)

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedhubert import compat
from fedhubert.audio import load_audio
from fedhubert.checkpoint import (HF_KEY_MAP, export_huggingface, hf_key, load_checkpoint, read_checkpoint,
                                  save_checkpoint)
from fedhubert.config import Config, config_from_dict
from fedhubert.errors import DataError
from fedhubert.model import HubertBase

ROOT = Path(__file__).resolve().parents[1]
FLAC = ROOT / "corpus/LibriSpeech/test-other/1688/142285/1688-142285-0000.flac"
TINY = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384, conv_dim=128,
            final_dim=64, vocab_size=104)


def make_cfg(case: str) -> Config:
    if case == "base":
        return Config()
    model = dict(TINY, layer_norm_first=case == "tiny_prenorm")
    return config_from_dict({"model": model, "kmeans": {"n_clusters": 100}})


def perturbed(model: HubertBase) -> HubertBase:
    """Randomises the parameters init leaves constant (norms, biases) so a swapped name cannot hide."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and p.std() == 0:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def hub():
    import s3prl.hub

    return s3prl.hub


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    return load_audio(FLAC, 16000)[16000:32000]  # 1 s of real speech


def max_diffs(ours: list[torch.Tensor], theirs) -> list[float]:
    assert len(ours) == len(theirs)
    return [float((a - b).abs().max()) for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("case", ["tiny", "tiny_prenorm", "base"])
def test_hidden_states_equal_s3prl_and_transformers(case, tmp_path, hub, speech):
    from transformers import HubertModel

    cfg = make_cfg(case)
    torch.manual_seed(0)
    model = perturbed(HubertBase.from_config(cfg)).eval()
    save_checkpoint(tmp_path / "ckpt.pt", model, cfg)
    export_huggingface(model, cfg, tmp_path / "hf")
    with torch.no_grad():
        ours, frame_padding = model.extract_hidden_states(speech[None])
        assert frame_padding is None and len(ours) == cfg.model.num_hidden_layers + 1
        upstream = hub.hubert_local(ckpt=str(tmp_path / "ckpt.pt")).eval()
        assert max(max_diffs(ours, upstream([speech])["hidden_states"])) <= 1e-4
        del upstream
        hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert hf_cfg["mask_time_prob"] == pytest.approx(0.8) and hf_cfg["model_type"] == "hubert"
        hf, info = HubertModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
        assert not any(info.values()), info  # no missing / unexpected / mismatched keys
        assert max(max_diffs(ours, hf.eval()(speech[None], output_hidden_states=True).hidden_states)) <= 1e-4


def test_padded_batch_equals_s3prl(tmp_path, hub, speech):
    cfg = make_cfg("tiny")
    torch.manual_seed(1)
    model = perturbed(HubertBase.from_config(cfg)).eval()
    save_checkpoint(tmp_path / "ckpt.pt", model, cfg)
    lengths = [16000, 11000, 7301]
    wavs = [speech[:n] for n in lengths]
    padding = torch.arange(16000)[None, :] >= torch.tensor(lengths)[:, None]
    batch = torch.stack([torch.nn.functional.pad(w, (0, 16000 - len(w))) for w in wavs])
    with torch.no_grad():
        ours, frame_padding = model.extract_hidden_states(batch, padding)
        theirs = hub.hubert_local(ckpt=str(tmp_path / "ckpt.pt")).eval()(wavs)["hidden_states"]
    assert frame_padding[0].sum() == 0 and frame_padding[1].sum() > 0 and frame_padding[2].sum() > frame_padding[1].sum()
    assert max(max_diffs(ours, theirs)) <= 1e-4


def test_checkpoint_is_plain_s3prl_format_and_round_trips(tmp_path):
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertPretrainingConfig
    from s3prl.upstream.utils import merge_with_parent

    cfg = make_cfg("tiny")
    model = HubertBase.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters())
    wav = torch.randn(2, 16000)
    model.pretraining_step(wav, None, torch.randint(4, 104, (2, 49))).loss.backward()
    opt.step()
    path = tmp_path / "round_3.pt"
    save_checkpoint(path, model, cfg, round=3, optimizer=opt.state_dict(), history=[{"loss": np.float64(1.5)}])

    raw = torch.load(path, weights_only=True)
    assert raw["dictionaries_symbols"] == [["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(100)]]
    model_cfg = merge_with_parent(HubertConfig, raw["model_cfg"])
    task_cfg = merge_with_parent(HubertPretrainingConfig, raw["task_cfg"])
    assert model_cfg.mask_prob == pytest.approx(0.8) and model_cfg.mask_length == 10  # fairseq's units
    assert model_cfg.no_mask_overlap is False and model_cfg.encoder_layers == 2 and model_cfg.final_dim == 64
    assert model_cfg.label_rate == 50 and task_cfg.label_rate == 50 and task_cfg.normalize is False
    assert raw["task_cfg"]["labels"] == ["km"]
    assert sorted(raw) == sorted(["task_cfg", "model_cfg", "model_weight", "dictionaries_symbols",
                                  "fedhubert_config", "round", "optimizer", "history"])

    loaded, loaded_cfg, extras = load_checkpoint(path)
    assert loaded_cfg.to_dict() == cfg.to_dict()
    assert extras["round"] == 3 and extras["history"] == [{"loss": 1.5}]
    assert type(extras["history"][0]["loss"]) is float  # numpy scalars are stored as Python numbers
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.optim.AdamW(loaded.parameters()).load_state_dict(extras["optimizer"])
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_checkpoint_loads_in_fresh_process_with_s3prl(tmp_path):
    cfg = make_cfg("tiny")
    save_checkpoint(tmp_path / "ckpt.pt", HubertBase.from_config(cfg), cfg)
    code = ("import fedhubert.compat, torch, s3prl.hub as hub; "
            f"up = hub.hubert_local(ckpt={str(tmp_path / 'ckpt.pt')!r}); "
            "hs = up([torch.randn(16000)])['hidden_states']; print('layers', len(hs), tuple(hs[-1].shape))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "layers 3 (1, 49, 96)" in run.stdout


def test_save_rejects_what_weights_only_cannot_read(tmp_path):
    cfg = make_cfg("tiny")
    model = HubertBase.from_config(cfg)
    with pytest.raises(TypeError, match="extras.state.obj"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, state={"obj": object()})
    with pytest.raises(TypeError, match=r"extras.m\[0\]' is a ndarray.*torch.from_numpy"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, m=[np.zeros(3)])
    with pytest.raises(ValueError, match="model_weight"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, model_weight={})
    assert not list(tmp_path.iterdir())


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found.*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match="corrupt.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"model_weight": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a HuBERT checkpoint .missing task_cfg, model_cfg"):
        load_checkpoint(tmp_path / "other.pt")
    cfg = make_cfg("tiny")
    save_checkpoint(tmp_path / "ok.pt", HubertBase.from_config(cfg), cfg)
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    state["fedhubert_config"]["model"]["intermediate_size"] = 200
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(DataError, match="mismatch.pt: weights do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")


def test_loads_a_plain_s3prl_checkpoint_without_our_config(tmp_path):
    cfg = make_cfg("tiny_prenorm")
    model = HubertBase.from_config(cfg)
    save_checkpoint(tmp_path / "ours.pt", model, cfg)
    state = read_checkpoint(tmp_path / "ours.pt")
    del state["fedhubert_config"]
    state["model_cfg"]["conv_feature_layers"] = "[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2"  # fairseq style
    torch.save(state, tmp_path / "converted.pt")
    loaded, loaded_cfg, extras = load_checkpoint(tmp_path / "converted.pt")
    assert loaded_cfg.model == cfg.model and extras == {}
    assert loaded_cfg.data.mask_prob == pytest.approx(0.08) and loaded_cfg.data.mask_length == 10
    state["model_cfg"]["extractor_mode"] = "layer_norm"
    torch.save(state, tmp_path / "variant.pt")
    with pytest.raises(DataError, match="variant.pt: a HuBERT variant"):
        load_checkpoint(tmp_path / "variant.pt")


@pytest.mark.parametrize("case", ["tiny", "tiny_prenorm"])
def test_hf_key_map_covers_every_parameter(case):
    from transformers import HubertConfig, HubertModel

    from fedhubert.checkpoint import hf_config

    cfg = make_cfg(case)
    names = HubertBase.from_config(cfg).state_dict()
    mapped = {hf_key(n) for n in names} - {None}
    assert len(mapped) == len(names) - 3  # all but final_proj.{weight,bias}, label_embs_concat
    hf_names = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v")
                for k in HubertModel(HubertConfig(**hf_config(cfg))).state_dict()}
    assert mapped == hf_names
    assert len(HF_KEY_MAP) == len({p for p, _ in HF_KEY_MAP})
    with pytest.raises(KeyError, match="no Hugging Face name"):
        hf_key("encoder.something_new")


def test_export_replaces_an_existing_folder_atomically(tmp_path):
    cfg = make_cfg("tiny")
    folder = tmp_path / "out" / "hf"
    folder.mkdir(parents=True)
    (folder / "stale.bin").write_bytes(b"old")
    export_huggingface(HubertBase.from_config(cfg), cfg, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["hf"]  # no temporary folders left
    run = subprocess.run([sys.executable, "export_huggingface.py", str(tmp_path / "nope.pt"), str(folder)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "checkpoint not found" in run.stderr


def test_s3prl_downstream_wrapper_trains_with_our_checkpoint(tmp_path):
    cfg = make_cfg("tiny")
    save_checkpoint(tmp_path / "ckpt.pt", HubertBase.from_config(cfg), cfg)
    (tmp_path / "config.yaml").write_text(
        "runner: {total_steps: 2, gradient_clipping: 1, gradient_accumulate_steps: 1, log_step: 1, "
        "eval_step: 1000, save_step: 2, max_keep: 1, eval_dataloaders: []}\n"
        "optimizer: {name: TorchOptim, torch_optim_name: Adam, lr: 1.0e-4}\n"
        "downstream_expert: {datarc: {num_workers: 0, train_batch_size: 1, eval_batch_size: 1}, "
        "modelrc: {input_dim: 8}}\n")
    run = subprocess.run([sys.executable, str(ROOT / "run_s3prl_downstream.py"), "-m", "train", "-u", "hubert_local",
                          "-k", str(tmp_path / "ckpt.pt"), "-d", "example", "-c", str(tmp_path / "config.yaml"),
                          "-p", str(tmp_path / "exp"), "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "exp" / "states-2.ckpt").is_file()


# --- compat --------------------------------------------------------------------------------------------

def test_compat_restores_torchaudio_io(tmp_path):
    import torchaudio

    importlib.reload(compat)  # idempotent
    torchaudio.set_audio_backend("sox_io")
    wav, sr = torchaudio.load(str(FLAC))
    expected, _ = sf.read(FLAC, dtype="float32")
    assert sr == 16000 and wav.dtype == torch.float32 and wav.shape == (1, len(expected))
    assert torch.equal(wav[0], torch.from_numpy(expected))
    meta = torchaudio.info(str(FLAC))
    assert (meta.sample_rate, meta.num_frames, meta.num_channels, meta.bits_per_sample) == (16000, len(expected), 1, 16)
    part, _ = torchaudio.load(str(FLAC), frame_offset=100, num_frames=50)
    assert torch.equal(part[0], wav[0, 100:150])
    stereo = torch.stack([wav[0, :8000], -wav[0, :8000]])
    torchaudio.save(str(tmp_path / "s.wav"), stereo, 16000)
    back, _ = torchaudio.load(str(tmp_path / "s.wav"))
    assert back.shape == (2, 8000) and (back - stereo).abs().max() < 1e-4
    ints, _ = torchaudio.load(str(tmp_path / "s.wav"), normalize=False)
    assert ints.dtype == torch.int16


def test_compat_sox_effects():
    from torchaudio.sox_effects import apply_effects_file, apply_effects_tensor

    wav = torch.from_numpy(np.stack([np.sin(np.arange(16000) / 10.0), np.zeros(16000)]).astype(np.float32)) * 0.5
    out, sr = apply_effects_tensor(wav, 16000, [["channels", "1"], ["rate", "8000"], ["norm"]])
    assert sr == 8000 and out.shape == (1, 8000) and out.abs().max() == pytest.approx(1.0)
    out, _ = apply_effects_tensor(wav, 16000, [["gain", "-6.0206"]])
    assert out.abs().max() == pytest.approx(0.25, rel=1e-4)
    out, _ = apply_effects_tensor(wav[:1], 16000, [["pad", "0.5", "100s"], ["trim", "0.5", "0.25"], ["reverse"]])
    assert torch.equal(out, wav[:1, :4000].flip(1))
    out, sr = apply_effects_file(str(FLAC), [["channels", "1"], ["rate", "16000"], ["gain", "-n", "-3"]])
    assert sr == 16000 and out.abs().max() == pytest.approx(10 ** (-3 / 20), rel=1e-5)
    with pytest.raises(NotImplementedError, match="'vad' is not available without libsox"):
        apply_effects_tensor(wav, 16000, [["vad", "-T", "0.25"]])
