"""Checkpoints: atomic save/load in s3prl's "converted HuBERT" format, and Hugging Face export.

A checkpoint is one ``torch.save``d dict of plain types and tensors (``torch.load(weights_only=True)``
safe). Its keys ``task_cfg``, ``model_cfg``, ``model_weight`` and ``dictionaries_symbols`` make it a valid
``s3prl.hub.hubert_local`` checkpoint as is; ``fedhubert_config`` holds our full Config (its model and
mask keys always describe the saved weights); any other key is a caller's extra (round, optimizer, ...).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhubert.config import FRAME_STRIDE, NUM_SPECIAL_SYMBOLS, Config, config_from_dict
from fedhubert.errors import ConfigError, DataError, OutputError
from fedhubert.fileio import atomic_path
from fedhubert.model import CONV_LAYERS, HEAD_PARAM_PREFIXES, HubertBase, fairseq_mask_prob

S3PRL_KEYS = ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols")
CONFIG_KEY = "fedhubert_config"
SPECIAL_SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq Dictionary's first four entries


# --- s3prl / fairseq format ---------------------------------------------------------------------------

def conv_feature_layers(conv_dim: int) -> str:
    """fairseq's ``conv_feature_layers`` string, e.g. "[(512, 10, 5), (512, 3, 2), ...]"."""
    return repr([(conv_dim, k, s) for k, s in CONV_LAYERS])


def dictionary_symbols(vocab_size: int) -> list[str]:
    """fairseq dictionary of the k-means labels: 4 specials, then "0".."K-1" (cluster c is id c + 4)."""
    return SPECIAL_SYMBOLS + [str(c) for c in range(vocab_size - NUM_SPECIAL_SYMBOLS)]


def s3prl_task_cfg(cfg: Config) -> dict[str, Any]:
    """fairseq HubertPretrainingConfig fields (s3prl keeps the ones its dataclass knows)."""
    return {"_name": "hubert_pretraining", "data": cfg.data.partitions_dir, "labels": ["km"],
            "label_rate": cfg.data.sample_rate / FRAME_STRIDE, "sample_rate": cfg.data.sample_rate,
            "normalize": False, "enable_padding": False, "max_keep_size": None,
            "max_sample_size": cfg.data.max_audio_length, "min_sample_size": cfg.data.min_audio_length,
            "random_crop": True, "pad_audio": False, "single_target": False, "fine_tuning": False}


def s3prl_model_cfg(cfg: Config) -> dict[str, Any]:
    """fairseq HubertConfig fields of ``cfg.model`` (masking in fairseq's units, see fairseq_mask_prob)."""
    m, t = cfg.model, cfg.training
    return {"_name": "hubert", "label_rate": cfg.data.sample_rate / FRAME_STRIDE, "extractor_mode": "default",
            "encoder_layers": m.num_hidden_layers, "encoder_embed_dim": m.hidden_size,
            "encoder_ffn_embed_dim": m.intermediate_size, "encoder_attention_heads": m.num_attention_heads,
            "activation_fn": "gelu", "layer_type": "transformer", "dropout": m.hidden_dropout,
            "attention_dropout": m.attention_dropout, "activation_dropout": m.activation_dropout,
            "encoder_layerdrop": m.layerdrop, "dropout_input": m.feat_proj_dropout,
            "dropout_features": m.dropout_features, "final_dim": m.final_dim, "untie_final_proj": False,
            "layer_norm_first": m.layer_norm_first, "conv_feature_layers": conv_feature_layers(m.conv_dim),
            "conv_bias": False, "logit_temp": m.logit_temp, "target_glu": False,
            "feature_grad_mult": m.feature_grad_mult, "mask_length": cfg.data.mask_length,
            "mask_prob": fairseq_mask_prob(cfg.data.mask_prob, cfg.data.mask_length), "mask_selection": "static",
            "mask_other": 0.0, "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_length": 10,
            "mask_channel_prob": 0.0, "mask_channel_selection": "static", "mask_channel_other": 0.0,
            "no_mask_channel_overlap": False, "mask_channel_min_space": 1, "conv_pos": m.conv_pos,
            "conv_pos_groups": m.conv_pos_groups, "latent_temp": [2.0, 0.5, 0.999995], "skip_masked": False,
            "skip_nomask": False, "checkpoint_activations": t.gradient_checkpointing,
            "required_seq_len_multiple": 2, "fp16": t.precision == "fp16"}


def _config_for(model: HubertBase, cfg: Config) -> Config:
    """``cfg`` with its model and mask keys taken from ``model`` (they must describe the weights)."""
    out = copy.deepcopy(cfg)
    out.model = copy.deepcopy(model.cfg)
    out.data.mask_prob, out.data.mask_length = model.mask_prob, model.mask_length
    return out


def _plain(value: Any, where: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: containers of plain types and
    tensors. numpy scalars become Python numbers; anything else (numpy arrays, objects) is an error."""
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"checkpoint extra '{where}' is a {type(value).__name__}; only plain types and tensors can "
                    "be saved (torch.load(weights_only=True) must read it): convert arrays with torch.from_numpy")


def save_checkpoint(path: str | os.PathLike, model: HubertBase, cfg: Config, **extras: Any) -> None:
    """Writes ``path`` atomically: an s3prl-loadable HuBERT checkpoint plus our config and ``extras``. A write
    that fails (a full disk, a failed rename) raises OutputError naming ``path``, which keeps what it held
    before; a killed process leaves at most a temporary file beside it (fileio.py)."""
    for key in extras:
        if key in S3PRL_KEYS or key == CONFIG_KEY:
            raise ValueError(f"checkpoint extra '{key}' would overwrite a reserved key")
    extras = _plain(extras, "extras")
    cfg = _config_for(model, cfg)
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    state = {"task_cfg": s3prl_task_cfg(cfg), "model_cfg": s3prl_model_cfg(cfg), "model_weight": weights,
             "dictionaries_symbols": [dictionary_symbols(cfg.model.vocab_size)], CONFIG_KEY: cfg.to_dict(), **extras}
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:  # a full disk reaches us from torch's zip writer as a RuntimeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        free = shutil.disk_usage(Path(path).parent).free / 2 ** 20  # torch's message does not say "disk full"
        raise OutputError(f"could not write {path} ({first}; {free:.0f} MiB free there); an earlier file of that "
                          "name is unchanged") from None


def load_plain(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: plain types and tensors, never code. Every file of ours
    (checkpoints, client heads) is read through it. A file that holds other pickled objects (a class
    instance, a crafted ``__reduce__``) is refused before any of it is built, with a DataError naming the
    file; so is a missing or unreadable one. ``mmap`` leaves the tensors on disk until touched."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    mmap = mmap and zipfile.is_zipfile(path)  # a legacy (bare pickle) file cannot be mapped: read it, safely
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch's safe unpickler refused it, or it is no torch file at all
        found = _pickled_object(path, str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if found:
            raise DataError(f"{path}: refused: it holds pickled Python objects ({found}) besides plain types and "
                            "tensors; unpickling them could run code, so nothing of it was loaded (no file this "
                            "project writes holds any)") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a readable checkpoint ({first})") from None


def _pickled_object(path: Path, message: str) -> str | None:
    """What a file torch's safe unpickler refused asks to build ("GLOBAL module.name"), read from torch's
    message or from the pickle's opcodes (pickletools only lists them: nothing is built); None when the
    file is no pickle at all (garbage, truncated)."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if found:
        return f"GLOBAL {found.group(1)}"
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name in ("GLOBAL", "INST"):
                return f"GLOBAL {str(arg).replace(' ', '.')}"
            if opcode.name == "STACK_GLOBAL":
                return f"GLOBAL {'.'.join(strings[-2:])}"
    except Exception:  # noqa: BLE001 - not a pickle stream: garbage, truncated, or a zip without data.pkl
        return None
    return None


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The raw dict of a checkpoint (:func:`load_plain`); DataError naming ``path`` when unusable. ``mmap``
    leaves the tensors on disk until touched (for reading the config and extras of a large file)."""
    path = Path(path)
    state = load_plain(path, mmap=mmap)
    missing = [k for k in S3PRL_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DataError(f"{path}: not a HuBERT checkpoint (missing {', '.join(missing)})")
    return state


def _config_from_fairseq(state: dict[str, Any], path: Path) -> Config:
    """Our Config for a checkpoint written by s3prl's converter (e.g. a released HuBERT)."""
    m, task, symbols = state["model_cfg"], state["task_cfg"], state["dictionaries_symbols"]
    try:
        layers = _parse_conv_layers(str(m.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")))
        supported = (len(symbols) == 1 and m.get("extractor_mode", "default") == "default"
                     and not m.get("conv_bias", False) and not m.get("untie_final_proj", False)
                     and not m.get("target_glu", False) and m.get("activation_fn", "gelu") == "gelu"
                     and m.get("layer_type", "transformer") == "transformer" and m.get("pos_conv_depth", 1) == 1
                     and layers is not None and [(k, s) for _, k, s in layers] == CONV_LAYERS
                     and len({c for c, _, _ in layers}) == 1)
        if not supported:
            raise DataError(f"{path}: a HuBERT variant this code does not build (only the Base/Large "
                            "architecture with one label set and the default CNN)")
        mask_length = int(m.get("mask_length", 10))
        return config_from_dict({
            "data": {"sample_rate": int(task.get("sample_rate", 16000)), "mask_length": mask_length,
                     "mask_prob": float(m.get("mask_prob", 0.8)) / mask_length},
            "kmeans": {"n_clusters": len(symbols[0]) - NUM_SPECIAL_SYMBOLS},
            "model": {"hidden_size": m["encoder_embed_dim"], "num_hidden_layers": m["encoder_layers"],
                      "num_attention_heads": m["encoder_attention_heads"],
                      "intermediate_size": m["encoder_ffn_embed_dim"], "conv_dim": layers[0][0],
                      "hidden_dropout": m.get("dropout", 0.1), "attention_dropout": m.get("attention_dropout", 0.1),
                      "activation_dropout": m.get("activation_dropout", 0.0),
                      "feat_proj_dropout": m.get("dropout_input", 0.0),
                      "dropout_features": m.get("dropout_features", 0.0),
                      "layerdrop": m.get("encoder_layerdrop", 0.0), "vocab_size": len(symbols[0]),
                      "final_dim": m.get("final_dim", 0) or m["encoder_embed_dim"],
                      "logit_temp": m.get("logit_temp", 0.1), "layer_norm_first": m.get("layer_norm_first", False),
                      "feature_grad_mult": m.get("feature_grad_mult", 1.0), "conv_pos": m.get("conv_pos", 128),
                      "conv_pos_groups": m.get("conv_pos_groups", 16)},
        })
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DataError(f"{path}: model_cfg/task_cfg do not describe a model we can build ({exc})") from None


def _parse_conv_layers(text: str) -> list[tuple[int, int, int]] | None:
    """fairseq's ``conv_feature_layers`` ("[(512,10,5)] + [(512,3,2)] * 4 + ...") without eval()."""
    layers: list[tuple[int, int, int]] = []
    try:
        for term in text.split("+"):
            part, _, times = term.partition("]")
            block = ast.literal_eval(part.strip() + "]")
            repeat = int(times.replace("*", "").strip() or 1)
            layers += [tuple(int(v) for v in layer) for layer in block] * repeat
    except (ValueError, SyntaxError, TypeError):
        return None
    return layers if all(len(layer) == 3 for layer in layers) else None


def load_checkpoint(path: str | os.PathLike) -> tuple[HubertBase, Config, dict[str, Any]]:
    """(model on CPU in train mode, its Config, the extras) of a checkpoint from :func:`save_checkpoint`,
    or of any s3prl-converted HuBERT checkpoint of the same architecture (then with default other keys)."""
    path = Path(path)
    state = read_checkpoint(path)
    if CONFIG_KEY in state:
        try:
            cfg = config_from_dict(state[CONFIG_KEY])
        except ConfigError as exc:
            raise DataError(f"{path}: saved config is invalid ({exc})") from None
    else:
        cfg = _config_from_fairseq(state, path)
    model = HubertBase.from_config(cfg)
    try:
        model.load_state_dict(state["model_weight"])
    except RuntimeError as exc:
        raise DataError(f"{path}: weights do not fit the saved config ({str(exc).splitlines()[0]} ...)") from None
    extras = {k: v for k, v in state.items() if k not in S3PRL_KEYS and k != CONFIG_KEY}
    return model, cfg, extras


# --- Hugging Face ---------------------------------------------------------------------------------------

# fairseq name (ours) -> transformers.HubertModel name. The prediction head has no HF counterpart.
HF_KEY_MAP: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", r"feature_extractor.conv_layers.\1.conv.weight"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]


def hf_key(name: str) -> str | None:
    """The transformers name of one of our parameters; None for the prediction head."""
    if name.startswith(HEAD_PARAM_PREFIXES):
        return None
    for pattern, replacement in HF_KEY_MAP:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no Hugging Face name for parameter '{name}'")


def hf_config(cfg: Config) -> dict[str, Any]:
    """transformers HubertConfig (as a dict) of ``cfg.model``."""
    from transformers import HubertConfig

    m = cfg.model
    values = dict(
        hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size, hidden_act="gelu", hidden_dropout=m.hidden_dropout,
        activation_dropout=m.activation_dropout, attention_dropout=m.attention_dropout,
        feat_proj_layer_norm=True, feat_proj_dropout=m.feat_proj_dropout, layerdrop=m.layerdrop,
        layer_norm_eps=1e-5, feat_extract_norm="group", feat_extract_activation="gelu",
        conv_dim=[m.conv_dim] * len(CONV_LAYERS), conv_kernel=[k for k, _ in CONV_LAYERS],
        conv_stride=[s for _, s in CONV_LAYERS], conv_bias=False, num_conv_pos_embeddings=m.conv_pos,
        num_conv_pos_embedding_groups=m.conv_pos_groups, do_stable_layer_norm=m.layer_norm_first,
        mask_time_prob=fairseq_mask_prob(cfg.data.mask_prob, cfg.data.mask_length),
        mask_time_length=cfg.data.mask_length, architectures=["HubertModel"])
    # what save_pretrained writes (model_type, transformers_version, non-defaults), plus every key we set
    return {**HubertConfig(**values).to_diff_dict(), **values}


def hf_state_dict(model: HubertBase, with_mask_emb: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under transformers names (float32, CPU, contiguous)."""
    out = {}
    for name, value in model.state_dict().items():
        key = hf_key(name)
        if key is not None and (with_mask_emb or name != "mask_emb"):
            out[key] = value.detach().to("cpu", torch.float32, copy=True).contiguous()
    if model.post_extract_proj is None:  # HF always projects: an identity does what fairseq skips
        out["feature_projection.projection.weight"] = torch.eye(model.cfg.hidden_size)
        out["feature_projection.projection.bias"] = torch.zeros(model.cfg.hidden_size)
    return out


def export_huggingface(model: HubertBase, cfg: Config, folder: str | os.PathLike) -> Path:
    """Writes ``folder`` (config.json + model.safetensors) for ``transformers.HubertModel.from_pretrained``.
    Built in a temporary sibling folder and renamed into place, so ``folder`` is never half-written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = _config_for(model, cfg)
    config = hf_config(cfg)
    tensors = hf_state_dict(model, with_mask_emb=config["mask_time_prob"] > 0)  # HF has no mask_emb then
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes a 0700 folder: give the usual permissions
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        old = None
        if folder.exists():  # a directory cannot be replaced in one rename: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
