"""The federated tasks: one Flower machinery (apps, strategy, checkpoints, resume, metrics), several
stages plugged into it. A task says what the model is, which weights stay on the client, the local
loss, where its files go and how its checkpoints are written; everything else is shared.

- ``pretraining``: HuBERT masked prediction; the encoder travels, and the prediction head too with
  ``kmeans.codebook: federated`` (one codebook: the ids mean the same on every client); with ``local``
  each client's head stays on it (task.head_is_federated decides, for client and server alike). Round 0
  is the seeded model, or with ``federation.init_checkpoint`` (HuBERT's next iteration) that
  checkpoint's encoder under a fresh seeded head (:func:`init_from_checkpoint`).
- ``distillation``: a student HuBERT learns from the frozen federated teacher; the student encoder and
  the hidden-prediction heads travel, the student's prediction head as the pretraining head does. The
  logits loss uses the teacher's own (global) head when the teacher's codebook was federated, else
  each client's head from pretraining.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from fedhubert.checkpoint import export_huggingface, load_checkpoint, load_plain, save_checkpoint
from fedhubert.config import Config
from fedhubert.distill import (DistillationLoss, DistillationModel, freeze, init_from_teacher, student_config,
                               target_layers)
from fedhubert.errors import ConfigError, DataError
from fedhubert.federation.metrics import CURVES, HEALTH_CURVES
from fedhubert.federation.task import (build_model, client_checkpoint_dir, file_sha1, head_files, head_is_federated,
                                       is_head_param, node_heads_dir, node_path, targets_fingerprint)
from fedhubert.model import HEAD_PARAM_PREFIXES, HubertBase
from fedhubert.train import LossFn, pretraining_loss

log = logging.getLogger(__name__)

# The model keys that decide what the encoder's weights compute; the others (dropouts, layerdrop,
# feature_grad_mult, logit_temp) are training knobs, and vocab_size/final_dim belong to the head.
ENCODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                "layer_norm_first", "conv_pos", "conv_pos_groups")
# What every checkpoint of a run shares, whatever the task: the clients' data and the label space.
# --resume refuses another value of these (rundir.check_resume); training knobs (rounds, rates, the
# strategy) may change. Paths are compared absolute, as the server saves them.
DATA_KEYS = ("data.partitions_dir", "partition.num_clients", "kmeans.codebook")


class FederatedTask:
    """The pretraining task; DistillationTask overrides what differs."""
    name = "pretraining"
    best_name = "best_global_model"  # <checkpoint_dir>/server/<best_name>.pt and <best_name>_hf/
    head_prefix = "head"             # a client's local weights: <client dir>/<head_prefix>_round_<r>.pt
    curves = CURVES + HEALTH_CURVES
    checkpoint_key = "federation.checkpoint_dir"
    # the keys a resumed run must share with its checkpoints: the saved model's shapes, the data, the labels
    run_keys = tuple(f"model.{k}" for k in (*ENCODER_KEYS, "vocab_size", "final_dim")) + DATA_KEYS
    # paths the run reads: --overwrite never moves a folder that holds one of them
    input_keys = ("data.librispeech_root", "data.partitions_dir", "federation.init_checkpoint")

    def checkpoint_dir(self, cfg: Config) -> Path:
        return Path(cfg.federation.checkpoint_dir)

    def num_rounds(self, cfg: Config) -> int:
        return cfg.federation.num_rounds

    def is_local(self, cfg: Config, name: str) -> bool:
        """Whether weight ``name`` stays on its client (never sent, never aggregated) in a run of ``cfg``."""
        return is_head_param(name) and not head_is_federated(cfg)

    def has_local(self, cfg: Config, model: torch.nn.Module) -> bool:
        """Whether a client keeps weights of its own (its head files) in a run of ``cfg``."""
        return any(self.is_local(cfg, name) for name in model.state_dict())

    def preflight(self, cfg: Config, resume: bool = False) -> None:
        """Checks what can be checked before anything is written (the simulation calls it, with the
        client folders at hand): the label space and, unless resuming, federation.init_checkpoint."""
        labels = self.check_label_space(cfg)
        if not resume and cfg.federation.init_checkpoint:
            init_from_checkpoint(cfg, labels.get("codebook_sha1"))

    def check_label_space(self, cfg: Config) -> dict[str, Any]:
        """Before the server writes anything (simulation and deployment): a federated head needs the
        shared codebook its labels came from (targets.check_codebook); a local head on shared labels is
        allowed (logged). Returns what the run's checkpoints record about their labels: with a
        federated head, ``codebook_sha1`` (resume and distillation check it); ``targets``, the
        partitions' targets.json (which features, iteration and K made the labels) when there is one."""
        return shared_labels(cfg, cfg.model.vocab_size)

    def initial_model(self, cfg: Config, labels: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
        """(the server's round-0 global model, what every checkpoint of the run records about it);
        ``labels`` is :meth:`check_label_space`'s answer."""
        return init_from_checkpoint(cfg, labels.get("codebook_sha1"))

    def client_model(self, cfg: Config, node_config: dict) -> torch.nn.Module:
        """The seeded model a client loads the global weights and its own head into."""
        return build_model(cfg)

    def client_loss(self, cfg: Config, partition_id: int, node_config: dict, data_dir: Path,
                    device: torch.device) -> LossFn:
        return pretraining_loss(cfg)

    def client_dir(self, cfg: Config, partition_id: int, node_config: dict) -> Path:
        return client_checkpoint_dir(self.checkpoint_dir(cfg), partition_id, node_config)

    def save(self, path: Path, model: torch.nn.Module, cfg: Config, **extras: Any) -> None:
        save_checkpoint(path, model, cfg, **extras)

    def load(self, path: Path, cfg: Config) -> tuple[torch.nn.Module, dict[str, Any]]:
        model, _, extras = load_checkpoint(path)
        return model, extras

    def export(self, model: torch.nn.Module, cfg: Config, folder: Path) -> None:
        export_huggingface(model, cfg, folder)


def shared_labels(cfg: Config, vocab_size: int) -> dict[str, Any]:
    """{"codebook_sha1": ...} of ``<partitions_dir>/codebook.npy`` when ``cfg``'s head is federated (after
    targets.check_codebook: one-line DataError when it is missing or does not fit ``vocab_size``), and
    {"targets": ...}, the partitions' targets.json, when there is one."""
    from fedhubert.targets import CODEBOOK_FILE, check_codebook, read_targets  # torchaudio, scikit-learn: only here

    labels: dict[str, Any] = {}
    targets = read_targets(cfg.data.partitions_dir)
    if targets is not None:
        labels["targets"] = targets
    codebook = Path(cfg.data.partitions_dir) / CODEBOOK_FILE
    if head_is_federated(cfg):
        labels["codebook_sha1"] = file_sha1(check_codebook(cfg, vocab_size))
    elif codebook.is_file():
        log.warning("%s exists: the clients' labels share one codebook, but kmeans.codebook is local, so each "
                    "prediction head stays on its client (kmeans.codebook=federated would federate it)", codebook)
    return labels


def init_from_checkpoint(cfg: Config, codebook_sha1: str | None = None) -> tuple[HubertBase, dict[str, Any]]:
    """The pretraining's round-0 model and what its checkpoints record about it.

    Without ``federation.init_checkpoint``: the seeded model (task.build_model), nothing recorded. With
    it: the seeded model with the checkpoint's encoder (everything but ``final_proj`` and
    ``label_embs_concat``), for HuBERT's next iteration on the targets made from that model. The head
    stays the fresh seeded one unless the label space is provably the same: both this run and the
    checkpoint federate the head (kmeans.codebook=federated) and the checkpoint's ``codebook_sha1`` is
    ``codebook_sha1``, the current codebook.npy's, with the same head shapes. Otherwise (other K, another
    codebook, per-client k-means whose ids mean something on one client only) the old head's ids would
    mean other sounds. Records ``init_checkpoint`` (path), ``init_checkpoint_sha1`` and ``init_head``
    (``fresh`` or ``checkpoint``). One-line DataError naming the file when it is missing or unreadable,
    ConfigError when its encoder does not have this config's architecture."""
    model = build_model(cfg)
    if not cfg.federation.init_checkpoint:
        return model, {}
    path = Path(cfg.federation.init_checkpoint)
    if not path.is_file():
        raise DataError(f"federation.init_checkpoint not found: {path} (the model the pretraining starts from; "
                        "empty = the seeded random init)")
    try:
        source, source_cfg, extras = load_checkpoint(path)
    except DataError as exc:
        raise DataError(f"federation.init_checkpoint: {exc}") from None
    differ = [f"model.{key} {getattr(source_cfg.model, key)} (config: {getattr(cfg.model, key)})"
              for key in ENCODER_KEYS if getattr(source_cfg.model, key) != getattr(cfg.model, key)]
    if differ:
        raise ConfigError(f"federation.init_checkpoint {path} has another encoder than the config's model.* keys: "
                          f"{', '.join(differ)}; use the same model.* keys as the run that wrote it")
    theirs, own = source.state_dict(), model.state_dict()
    model.load_state_dict({k: v for k, v in theirs.items() if not is_head_param(k)}, strict=False)
    same_labels = (head_is_federated(cfg) and head_is_federated(source_cfg) and codebook_sha1 is not None
                   and extras.get("codebook_sha1") == codebook_sha1
                   and all(theirs[k].shape == v.shape for k, v in own.items() if is_head_param(k)))
    if same_labels:
        model.load_state_dict({k: v for k, v in theirs.items() if is_head_param(k)}, strict=False)
    head = "checkpoint" if same_labels else "fresh"
    log.info("round 0 starts from the encoder of %s with %s", path,
             "its head (the same codebook.npy)" if same_labels else "a fresh seeded head (a new label space)")
    return model, {"init_checkpoint": str(path), "init_checkpoint_sha1": file_sha1(path), "init_head": head}


# --- distillation ------------------------------------------------------------------------------------

def teacher_file(cfg: Config, node_config: dict) -> Path:
    """The teacher checkpoint: the node's ``teacher-path`` (deployment), else distillation.teacher_model_path."""
    path = node_path(node_config, "teacher-path") or Path(cfg.distillation.teacher_model_path)
    if not path.is_file():
        raise DataError(f"teacher checkpoint not found: {path} (distillation.teacher_model_path): "
                        "run ./run_pretraining.sh with the same config first")
    return path


@functools.lru_cache(maxsize=1)
def _read_teacher(path: str, stamp: tuple[int, int]) -> tuple[HubertBase, Config, dict[str, Any]]:
    """The teacher file, read once per process while its (mtime, size) stamp is unchanged: a client
    builds its student from the teacher's config and its loss from the teacher itself, every round."""
    return load_checkpoint(path)


def _teacher(cfg: Config, node_config: dict) -> tuple[HubertBase, Config, dict[str, Any]]:
    path = teacher_file(cfg, node_config)
    stat = path.stat()
    return _read_teacher(str(path), (stat.st_mtime_ns, stat.st_size))


def load_teacher(cfg: Config, node_config: dict) -> tuple[HubertBase, Config, dict[str, Any]]:
    """A frozen copy of the teacher (weights_only-loaded; a client puts its own head on its copy), its
    config and extras; one-line DataError naming the file when it is missing or foreign."""
    teacher, teacher_cfg, extras = copy.deepcopy(_teacher(cfg, node_config))  # the cache stays untouched
    return freeze(teacher), teacher_cfg, extras


def teacher_config(cfg: Config, node_config: dict) -> Config:
    """The teacher's saved config."""
    return copy.deepcopy(_teacher(cfg, node_config)[1])


def teacher_head_dir(cfg: Config, partition_id: int, node_config: dict) -> Path:
    """Where client k's pretraining heads are: on a SuperNode the folder its pretraining wrote
    (task.node_heads_dir: ``checkpoint-path``, else ``<data-path>/heads``), else
    ``<teacher_heads_dir>/client_<k>`` (default: the clients/ folder beside the teacher's server/ folder)."""
    if (heads := node_heads_dir(node_config)) is not None:
        return heads
    d = cfg.distillation
    base = Path(d.teacher_heads_dir) if d.teacher_heads_dir else Path(d.teacher_model_path).parent.parent / "clients"
    return base / f"client_{partition_id}"


def saved_head(folder: Path, prefix: str, up_to_round: int) -> tuple[Path, dict[str, Any]] | None:
    """(path, contents) of the newest ``<prefix>_round_<r>.pt`` in ``folder`` with r <= ``up_to_round``."""
    saved = [(r, p) for r, p in head_files(folder, prefix) if r <= up_to_round]
    if not saved:
        return None
    return saved[-1][1], load_plain(saved[-1][1])


def teacher_head_is_global(teacher_cfg: Config) -> bool:
    """A teacher pretrained with ``kmeans.codebook: federated`` carries its trained, aggregated head: the
    logits loss uses it on every client. Otherwise each client uses its own head (:func:`teacher_head`)."""
    return head_is_federated(teacher_cfg)


def teacher_head(cfg: Config, teacher: HubertBase, teacher_extras: dict, partition_id: int, node_config: dict,
                 data_dir: Path) -> dict[str, torch.Tensor]:
    """Client k's own prediction head from pretraining (kmeans.codebook=local teachers), of the teacher's
    round or the newest before it, checked against the teacher's shapes and the client's current labels."""
    source = cfg.distillation.teacher_model_path
    if "round" not in teacher_extras:
        raise DataError(f"{source} records no pretraining round, so no client head belongs to it: the logits "
                        "loss needs a teacher from run_pretraining.sh (or set distillation.losses: [hidden])")
    teacher_round = int(teacher_extras["round"])
    folder = teacher_head_dir(cfg, partition_id, node_config)
    found = saved_head(folder, FederatedTask.head_prefix, teacher_round)
    if found is None:
        raise DataError(f"{folder}: no head_round_<r>.pt with r <= {teacher_round} (the teacher's round) for client "
                        f"{partition_id}: run ./run_pretraining.sh first, or set distillation.teacher_heads_dir")
    path, state = found
    head = state["head"]
    expected = {k: v.shape for k, v in teacher.state_dict().items() if k.startswith(HEAD_PARAM_PREFIXES)}
    if {k: v.shape for k, v in head.items()} != expected:
        raise DataError(f"{path}: head shapes {[tuple(v.shape) for v in head.values()]} do not match the teacher "
                        f"{source} ({[tuple(s) for s in expected.values()]}): a head of another model")
    recorded = state.get("targets_sha1")
    if recorded is not None and recorded != targets_fingerprint(data_dir):
        raise DataError(f"{data_dir / 'train.km'} changed since {path} was trained on it: the head's label ids no "
                        "longer mean these labels; re-run ./run_pretraining.sh on the current targets")
    return head


class DistillationTask(FederatedTask):
    name = "distillation"
    best_name = "best_student_model"
    head_prefix = "student_head"
    curves = (("loss", "distillation loss"), ("masked_kd_loss", "KD loss"), ("hidden_loss", "hidden loss"),
              ("masked_agreement", "student/teacher agreement")) + HEALTH_CURVES
    checkpoint_key = "distillation.checkpoint_dir"
    # the saved model is the student (its model.* keys are the student's): its shape keys, and the teacher
    run_keys = ("distillation.teacher_model_path", "distillation.student_hidden_size", "distillation.student_num_layers",
                "distillation.student_num_attention_heads", "distillation.student_intermediate_size",
                "distillation.student_conv_dim", "distillation.target_layers") + DATA_KEYS
    input_keys = ("data.librispeech_root", "data.partitions_dir", "distillation.teacher_model_path",
                  "distillation.teacher_heads_dir")

    def checkpoint_dir(self, cfg: Config) -> Path:
        return Path(cfg.distillation.checkpoint_dir)

    def num_rounds(self, cfg: Config) -> int:
        return cfg.distillation.num_rounds

    def is_local(self, cfg: Config, name: str) -> bool:
        return DistillationModel.is_local(name) and not head_is_federated(cfg)

    def _build(self, cfg: Config, teacher_cfg: Config) -> DistillationModel:
        self._check_vocabulary(cfg, teacher_cfg)
        layers = target_layers(cfg, teacher_cfg.model.num_hidden_layers, cfg.distillation.teacher_model_path)
        torch.manual_seed(cfg.seed)  # the server and every client build the same seeded student
        return DistillationModel(student_config(cfg, teacher_cfg.model), teacher_cfg.model.hidden_size, layers)

    @staticmethod
    def _check_vocabulary(cfg: Config, teacher_cfg: Config) -> None:
        if "logits" in cfg.distillation.losses and teacher_cfg.model.vocab_size != cfg.model.vocab_size:
            raise DataError(f"{cfg.distillation.teacher_model_path} predicts {teacher_cfg.model.vocab_size} labels but "
                            f"model.vocab_size is {cfg.model.vocab_size}: the teacher was trained on other targets; "
                            "run ./run_pretraining.sh on these targets first")

    def preflight(self, cfg: Config, resume: bool = False) -> None:
        teacher, teacher_cfg, extras = load_teacher(cfg, {})
        init_from_teacher(self._build(cfg, teacher_cfg), teacher, cfg.distillation.init_from_teacher)
        self.check_label_space(cfg)
        if "logits" in cfg.distillation.losses and not teacher_head_is_global(teacher_cfg):
            for k in range(cfg.partition.num_clients):
                teacher_head(cfg, teacher, extras, k, {}, Path(cfg.data.partitions_dir) / f"client_{k}")

    def check_label_space(self, cfg: Config) -> dict[str, Any]:
        """The student's head as the pretraining's (kmeans.codebook of this config); and a teacher whose
        head is global predicts the ids of the codebook it was trained on: that codebook must still be
        the one in data.partitions_dir (its SHA-1, recorded in the teacher's checkpoint)."""
        _, teacher_cfg, extras = _teacher(cfg, {})
        labels = shared_labels(cfg, teacher_cfg.model.vocab_size)
        if "logits" in cfg.distillation.losses and teacher_head_is_global(teacher_cfg):
            from fedhubert.targets import check_codebook

            source = cfg.distillation.teacher_model_path
            path = check_codebook(cfg, teacher_cfg.model.vocab_size,
                                  why=f"the teacher {source} was pretrained with kmeans.codebook=federated")
            recorded = extras.get("codebook_sha1")
            if recorded is not None and recorded != file_sha1(path):
                raise DataError(f"{path} is not the codebook the teacher {source} was pretrained on, so its head's ids "
                                "mean other sounds: re-run ./run_pretraining.sh on the current targets")
        return labels

    def initial_model(self, cfg: Config, labels: dict[str, Any]) -> tuple[DistillationModel, dict[str, Any]]:
        teacher, teacher_cfg, _ = load_teacher(cfg, {})
        model = self._build(cfg, teacher_cfg)
        copied = init_from_teacher(model, teacher, cfg.distillation.init_from_teacher)
        params = sum(p.numel() for p in model.student.parameters())
        log.info("student: %.2f M parameters (teacher %.2f M); copied from the teacher: %s", params / 1e6,
                 sum(p.numel() for p in teacher.parameters()) / 1e6, ", ".join(copied) or "nothing")
        return model, {}

    def client_model(self, cfg: Config, node_config: dict) -> DistillationModel:
        return self._build(cfg, teacher_config(cfg, node_config))

    def client_loss(self, cfg: Config, partition_id: int, node_config: dict, data_dir: Path,
                    device: torch.device) -> LossFn:
        teacher, teacher_cfg, extras = load_teacher(cfg, node_config)
        if "logits" in cfg.distillation.losses and not teacher_head_is_global(teacher_cfg):
            teacher.load_state_dict(teacher_head(cfg, teacher, extras, partition_id, node_config, data_dir),
                                    strict=False)
        return DistillationLoss(teacher.to(device), student_config(cfg, teacher_cfg.model))

    def save(self, path: Path, model: DistillationModel, cfg: Config, **extras: Any) -> None:
        save_checkpoint(path, model.student, cfg, hidden_heads=model.heads_state(),
                        target_layers=list(model.target_layers),
                        teacher_model_path=cfg.distillation.teacher_model_path, **extras)

    def load(self, path: Path, cfg: Config) -> tuple[DistillationModel, dict[str, Any]]:
        student, _, extras = load_checkpoint(path)
        model = self.client_model(cfg, {})
        if list(extras.get("target_layers", [])) != model.target_layers:
            raise ConfigError(f"{path} was trained for teacher layers {extras.get('target_layers')}, the config asks "
                              f"for {model.target_layers} (distillation.target_layers)")
        model.student.load_state_dict(student.state_dict())
        model.hidden_heads.load_state_dict(extras.pop("hidden_heads"))
        return model, extras

    def export(self, model: DistillationModel, cfg: Config, folder: Path) -> None:
        export_huggingface(model.student, cfg, folder)


TASKS: dict[str, FederatedTask] = {task.name: task for task in (FederatedTask(), DistillationTask())}


def get_task(name: str) -> FederatedTask:
    if name not in TASKS:
        raise ConfigError(f"unknown federated task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]
