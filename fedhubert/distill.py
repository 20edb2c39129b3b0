"""Distillation of the federated teacher into a smaller student HuBERT: the student model, its
initialisation from the teacher, the frozen teacher with a client's own prediction head, and the losses.

Two losses, selectable and combinable (``distillation.losses``):

- ``logits``: on the student's masked frames, ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
  + (1 - alpha) * CE(s, labels)``. Teacher and student logits are over the client's k-means label
  space. With per-client k-means (``kmeans.codebook: local``) the teacher uses *this client's*
  prediction head from pretraining and the student's head is client-local; with one shared codebook
  (``federated``, as the teacher was pretrained) the teacher uses its own aggregated head, and the
  student's head is federated (``kmeans.codebook`` of the distillation's config) as in pretraining.
- ``hidden`` (DistilHuBERT, Chang et al. 2022): one linear head per chosen teacher layer on the
  student's last layer, ``L1 + cos_weight * (-log sigmoid(cos))`` per layer, summed over layers. The
  heads mean the same thing on every client, so they are federated with the encoder. (The cosine
  term is shifted by a constant so that a perfect prediction scores 0; the gradient is DistilHuBERT's.)

The teacher runs in eval mode without gradients on the clean (unmasked) waveform.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedhubert.config import Config, ModelConfig
from fedhubert.data import IGNORE_INDEX, Batch
from fedhubert.errors import ConfigError
from fedhubert.model import HEAD_PARAM_PREFIXES, HubertBase

log = logging.getLogger(__name__)
STUDENT = "student."  # parameter-name prefix of the student inside DistillationModel


# --- losses ------------------------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over frames (rows). The T^2 factor
    keeps the gradient's scale independent of T (Hinton et al. 2015): the gradient w.r.t. the student
    logits is ``T * (softmax(s/T) - softmax(t/T)) / N``."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return t * t * kl.mean() if kl.numel() else student_logits.sum() * 0.0


def logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``alpha * KD + (1 - alpha) * CE``, KD, CE) over N frames: logits [N, V], targets [N]."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits.float(), targets) if targets.numel() else kd * 0.0
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


# -log sigmoid(1): DistilHuBERT's cosine term at a perfect prediction, subtracted so the loss is 0 there
_COS_TERM_AT_ONE = float(-F.logsigmoid(torch.tensor(1.0)))


def hidden_loss(prediction: torch.Tensor, target: torch.Tensor, cos_weight: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DistilHuBERT's layer-prediction loss over N frames [N, D]: (L1 + cos_weight * cos term, L1,
    cos term), with L1 the mean absolute error and the cos term ``mean(-log sigmoid(cos)) + log
    sigmoid(1)``: DistilHuBERT's term shifted by a constant (same gradient) so that it is 0 for a
    perfect prediction (cos = 1) and 1 for an opposite one (cos = -1)."""
    prediction, target = prediction.float(), target.float()
    l1 = F.l1_loss(prediction, target)
    cos = -F.logsigmoid(F.cosine_similarity(prediction, target, dim=-1)).mean() - _COS_TERM_AT_ONE
    return l1 + cos_weight * cos, l1, cos


# --- the student -------------------------------------------------------------------------------------

def default_target_layers(teacher_layers: int) -> list[int]:
    """1/3, 2/3 and all of the teacher's depth (4, 8, 12 for Base), 1-based, without repeats."""
    return sorted({max(1, round(teacher_layers * f)) for f in (1 / 3, 2 / 3, 1.0)})


def target_layers(cfg: Config, teacher_layers: int, source: str) -> list[int]:
    """The teacher layers the hidden heads regress (empty when the hidden loss is off)."""
    if "hidden" not in cfg.distillation.losses:
        return []
    layers = list(cfg.distillation.target_layers) or default_target_layers(teacher_layers)
    if max(layers) > teacher_layers:
        raise ConfigError(f"distillation.target_layers {layers}: the teacher {source} has only {teacher_layers} layers")
    return layers


def student_model_config(cfg: Config, teacher: ModelConfig) -> ModelConfig:
    """The teacher's architecture (dropouts, vocabulary, head size, ...) at the student's size."""
    d = cfg.distillation
    return dataclasses.replace(teacher, hidden_size=d.student_hidden_size, num_hidden_layers=d.student_num_layers,
                               num_attention_heads=d.student_num_attention_heads,
                               intermediate_size=d.student_intermediate_size,
                               conv_dim=d.student_conv_dim or teacher.conv_dim)


def student_config(cfg: Config, teacher: ModelConfig) -> Config:
    """``cfg`` whose model section describes the student (what its checkpoints and loaders use)."""
    out = copy.deepcopy(cfg)
    out.model = student_model_config(cfg, teacher)
    return out.validate()


class DistillationModel(nn.Module):
    """What the distillation federation trains: the student HuBERT (``student.*``, saved as an s3prl
    checkpoint) and one linear head per target teacher layer (``hidden_heads.<i>.*``)."""

    def __init__(self, student_cfg: Config, teacher_hidden_size: int, layers: list[int]):
        super().__init__()
        self.student = HubertBase.from_config(student_cfg)
        self.target_layers = list(layers)
        self.hidden_heads = nn.ModuleList(nn.Linear(student_cfg.model.hidden_size, teacher_hidden_size)
                                          for _ in self.target_layers)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.student.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.student.gradient_checkpointing = value

    @staticmethod
    def is_local(name: str) -> bool:
        """The student's prediction head, tied to the client's k-means ids: it stays on the client unless
        one codebook is shared (DistillationTask.is_local, task.head_is_federated)."""
        return name.startswith(tuple(STUDENT + p for p in HEAD_PARAM_PREFIXES))

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.hidden_heads.state_dict().items()}


def init_from_teacher(model: DistillationModel, teacher: HubertBase, parts: list[str]) -> list[str]:
    """Copies the ``parts`` of the teacher into the student ('cnn': the CNN feature encoder;
    'layers': front end, positional convolution and every k-th transformer layer). A part whose
    shapes do not match is a ConfigError, never a silent partial copy. Returns what was copied."""
    student, copied = model.student, []
    pairs: list[tuple[nn.Module, nn.Module, str]] = []
    if "cnn" in parts:
        if student.cfg.conv_dim != teacher.cfg.conv_dim:
            raise ConfigError(f"distillation.init_from_teacher has 'cnn' but the student's CNN has {student.cfg.conv_dim} "
                              f"channels and the teacher's {teacher.cfg.conv_dim} (set distillation.student_conv_dim: 0)")
        pairs.append((student.feature_extractor, teacher.feature_extractor, "CNN feature encoder"))
    if "layers" in parts:
        s, t = student.cfg, teacher.cfg
        if (s.hidden_size, s.intermediate_size, s.num_attention_heads, s.conv_dim) != (
                t.hidden_size, t.intermediate_size, t.num_attention_heads, t.conv_dim):
            raise ConfigError("distillation.init_from_teacher has 'layers' but the student's width, FFN, heads or CNN "
                              f"({s.hidden_size}, {s.intermediate_size}, {s.num_attention_heads}, {s.conv_dim}) differ "
                              f"from the teacher's ({t.hidden_size}, {t.intermediate_size}, {t.num_attention_heads}, "
                              f"{t.conv_dim})")
        if s.num_hidden_layers > t.num_hidden_layers:
            raise ConfigError(f"distillation.init_from_teacher has 'layers' but the student has more layers "
                              f"({s.num_hidden_layers}) than the teacher ({t.num_hidden_layers})")
        pairs += [(student.layer_norm, teacher.layer_norm, "feature layer norm"),
                  (student.encoder.pos_conv, teacher.encoder.pos_conv, "positional convolution"),
                  (student.encoder.layer_norm, teacher.encoder.layer_norm, "encoder layer norm")]
        if student.post_extract_proj is not None:
            pairs.append((student.post_extract_proj, teacher.post_extract_proj, "feature projection"))
        for i, j in enumerate(layer_map(s.num_hidden_layers, t.num_hidden_layers)):
            pairs.append((student.encoder.layers[i], teacher.encoder.layers[j], f"layer {i} <- teacher layer {j}"))
        with torch.no_grad():
            student.mask_emb.copy_(teacher.mask_emb)
        copied.append("mask embedding")
    for target, source, what in pairs:
        target.load_state_dict(source.state_dict())  # strict: equal names and shapes, checked above
        copied.append(what)
    return copied


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """0-based teacher layer for each student layer: the last of each equal group (12 -> 6: 1, 3, ..., 11)."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


# --- the step ----------------------------------------------------------------------------------------

@dataclass
class DistillOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def freeze(teacher: HubertBase) -> HubertBase:
    """Eval mode (no dropout, no layerdrop, no masking) and no gradients."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillationLoss:
    """The local loss of a distillation client: ``loss(model, batch)`` with this client's frozen teacher."""

    def __init__(self, teacher: HubertBase, cfg: Config) -> None:
        self.teacher, self.cfg = freeze(teacher), cfg

    def __call__(self, model: DistillationModel, batch: Batch) -> DistillOutput:
        return distillation_step(model, self.teacher, batch, self.cfg)


def distillation_step(model: DistillationModel, teacher: HubertBase, batch: Batch, cfg: Config) -> DistillOutput:
    """The distillation loss of one batch, with its metrics. The student is masked when the logits loss
    is on (KD and CE are on its masked frames); the hidden loss covers every unpadded frame."""
    d, student = cfg.distillation, model.student
    use_logits, use_hidden = "logits" in d.losses, "hidden" in d.losses
    with torch.no_grad():
        teacher_hidden, _ = teacher.extract_hidden_states(batch.waveforms, batch.padding_mask)
    out = student.encode(batch.waveforms, batch.padding_mask, mask=use_logits)
    valid = torch.ones(out.x.shape[:2], dtype=torch.bool, device=out.x.device)
    if out.frame_padding is not None:
        valid &= ~out.frame_padding
    loss = cfg.training.feature_pen_weight * out.penalty
    metrics: dict[str, Any] = {"feature_penalty": out.penalty.item()}

    if use_logits:
        targets = student.check_targets(batch.target_ids, batch.waveforms, out.x)
        selected = out.mask & valid & (targets != IGNORE_INDEX)
        student_logits = student.logits(out.x[selected])
        with torch.no_grad():
            teacher_logits = teacher.logits(teacher_hidden[-1][selected])
        total, kd, ce = logits_loss(student_logits, teacher_logits, targets[selected],
                                    alpha=d.alpha, temperature=d.temperature)
        loss = loss + total
        n = int(selected.sum())
        student_pred, teacher_pred = student_logits.argmax(-1), teacher_logits.argmax(-1)
        metrics.update(masked_kd_loss=kd.item(), masked_ce_loss=ce.item(), num_masked=float(n),
                       masked_accuracy=float((student_pred == targets[selected]).sum()) / max(n, 1),
                       masked_teacher_accuracy=float((teacher_pred == targets[selected]).sum()) / max(n, 1),
                       masked_agreement=float((student_pred == teacher_pred).sum()) / max(n, 1))
    if use_hidden:
        student_out = out.x[valid]
        layer_losses = []
        for head, layer in zip(model.hidden_heads, model.target_layers):
            total, l1, cos = hidden_loss(head(student_out), teacher_hidden[layer][valid], d.cos_weight)
            layer_losses.append(total)
            metrics[f"hidden_loss_layer{layer}"] = total.item()
        hidden = torch.stack(layer_losses).sum()
        loss = loss + d.hidden_weight * hidden
        metrics["hidden_loss"] = hidden.item()
    metrics["loss"] = loss.item()
    return DistillOutput(loss=loss, metrics=metrics)
