"""HuBERT in one file: CNN waveform encoder -> LayerNorm + projection -> span masking -> convolutional
positional embedding -> Transformer -> cosine-similarity logits against learned label embeddings.

Parameter names follow fairseq's ``HubertModel`` exactly, so ``model.state_dict()`` is the
``model_weight`` of an s3prl "converted" checkpoint as is (see checkpoint.py). The Base sizes are the
ModelConfig defaults; Large-style pre-norm is ``layer_norm_first``.

Masking uses the paper's p (``mask_prob``): every unpadded frame is, independently with probability
p, the start of a span of ``mask_length`` frames (spans may overlap and stay inside the utterance).
fairseq/s3prl write the same setting as ``mask_prob = p * mask_length``: see :func:`fairseq_mask_prob`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fedhubert.config import FRAME_LENGTH, NUM_SPECIAL_SYMBOLS, Config, ModelConfig, num_frames
from fedhubert.errors import ConfigError

# The client-specific prediction head: k-means ids mean nothing across clients, so never averaged.
HEAD_PARAM_PREFIXES = ("final_proj.", "label_embs_concat")
IGNORE_INDEX = -100  # target id of frames without a label
# (kernel, stride) of the 7 CNN layers; every layer has cfg.conv_dim channels. Total stride 320.
CONV_LAYERS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2


def fairseq_mask_prob(mask_prob: float, mask_length: int) -> float:
    """fairseq's ``mask_prob`` for the paper's p: fairseq draws ``mask_prob * T / mask_length`` spans."""
    return mask_prob * mask_length


@dataclasses.dataclass
class EncoderOutput:
    x: torch.Tensor                          # [B,T,H] output of the last layer (after the final norm)
    hidden: list[torch.Tensor]               # the input of every layer + the output, when asked for
    mask: torch.Tensor | None                # [B,T] frames replaced by mask_emb (None: no masking)
    frame_padding: torch.Tensor | None       # [B,T] True = padding
    penalty: torch.Tensor                    # mean squared CNN feature (HuBERT's feature penalty)


@dataclasses.dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar, normalised per masked frame (fairseq's hubert criterion)
    metrics: dict[str, float]


class _GradMultiply(torch.autograd.Function):
    """Identity forward; scales the gradient (fairseq's feature_grad_mult for the CNN)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 under autocast (statistics over ~8000 steps overflow bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class ConvFeatureExtractor(nn.Module):
    """7 strided convolutions, no bias, GELU; GroupNorm (one group per channel) after the first."""

    def __init__(self, conv_dim: int):
        super().__init__()
        blocks, in_ch = [], 1
        for i, (kernel, stride) in enumerate(CONV_LAYERS):
            conv = nn.Conv1d(in_ch, conv_dim, kernel, stride=stride, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            # fairseq's layout (conv, dropout p=0, [norm], GELU) fixes the names conv_layers.N.0 / .0.2
            norm = [Fp32GroupNorm(conv_dim, conv_dim)] if i == 0 else []
            blocks.append(nn.Sequential(conv, nn.Identity(), *norm, nn.GELU()))
            in_ch = conv_dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)  # [B, 1, L]
        for block in self.conv_layers:
            x = block(x)
        return x  # [B, C, T]


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is ``weight_v * weight_g / ||weight_v||`` with the norm taken over all
    axes but the kernel axis (torch's ``weight_norm(dim=2)``), stored under its ``weight_g/weight_v`` names."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        v = torch.empty(channels, channels // groups, kernel)
        nn.init.normal_(v, mean=0.0, std=math.sqrt(4.0 / (kernel * channels)))
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.weight_v = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.padding, self.groups = kernel // 2, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drops the extra last step an even kernel with padding k//2 produces, so length stays T."""

    def __init__(self, kernel: int):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : x.size(2) - self.remove]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # [B, heads, T, head_dim]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """Transformer block: post-norm (Base) or pre-norm (``layer_norm_first``), GELU feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.pre_norm = cfg.layer_norm_first

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(F.gelu(self.fc1(x)))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), attn_mask))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, attn_mask)))
        return self.final_layer_norm(x + self._ffn(x))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pos_conv = nn.Sequential(WeightNormConv1d(cfg.hidden_size, cfg.conv_pos, cfg.conv_pos_groups),
                                      SamePad(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layer_norm_first, self.layerdrop = cfg.layer_norm_first, cfg.layerdrop

    def forward(self, x: torch.Tensor, frame_padding: torch.Tensor | None, *, keep_hidden: bool = False,
                checkpointing: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B,T,H] -> (output [B,T,H], the input of every layer + the output if ``keep_hidden``)."""
        attn_mask = None
        if frame_padding is not None:
            x = x.masked_fill(frame_padding.unsqueeze(-1), 0.0)
            if frame_padding.any():  # [B,1,1,T], True = may attend; None keeps the fast SDPA kernels
                attn_mask = ~frame_padding[:, None, None, :]
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        hidden = []
        for layer in self.layers:
            if keep_hidden:
                hidden.append(x)
            if self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop:
                continue
            if checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        if keep_hidden:
            hidden.append(x)
        return x, hidden


class HubertBase(nn.Module):
    """HuBERT for masked-prediction pretraining (:meth:`pretraining_step`) and as a feature extractor
    (:meth:`extract_hidden_states`). ``mask_prob`` is the paper's p (see :meth:`sample_mask`)."""

    def __init__(self, model_cfg: ModelConfig, mask_prob: float = 0.08, mask_length: int = 10):
        super().__init__()
        cfg = model_cfg
        if cfg.hidden_size % cfg.num_attention_heads or cfg.hidden_size % cfg.conv_pos_groups:
            raise ConfigError(f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_attention_heads "
                              f"({cfg.num_attention_heads}) and model.conv_pos_groups ({cfg.conv_pos_groups})")
        if not 0.0 <= mask_prob <= 1.0 or mask_length < 1:
            raise ConfigError(f"data.mask_prob ({mask_prob}) must be in [0, 1] and data.mask_length ({mask_length}) >= 1")
        if cfg.vocab_size <= NUM_SPECIAL_SYMBOLS:
            raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) must exceed the {NUM_SPECIAL_SYMBOLS} special symbols")
        self.cfg = dataclasses.replace(cfg)  # own copy: the caller's config object may change later
        self.mask_prob, self.mask_length = float(mask_prob), int(mask_length)
        self.gradient_checkpointing = False

        self.feature_extractor = ConvFeatureExtractor(cfg.conv_dim)
        self.layer_norm = nn.LayerNorm(cfg.conv_dim)
        # fairseq has no projection when the CNN already has the transformer's width
        self.post_extract_proj = nn.Linear(cfg.conv_dim, cfg.hidden_size) if cfg.conv_dim != cfg.hidden_size else None
        self.dropout_input = nn.Dropout(cfg.feat_proj_dropout)
        self.mask_emb = nn.Parameter(torch.empty(cfg.hidden_size).uniform_())
        self.encoder = TransformerEncoder(cfg)
        self.final_proj = nn.Linear(cfg.hidden_size, cfg.final_dim)
        self.label_embs_concat = nn.Parameter(torch.empty(cfg.vocab_size, cfg.final_dim).uniform_())
        for module in self.encoder.layers.modules():  # BERT init, as fairseq's transformer encoder
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg: Config) -> "HubertBase":
        return cls(cfg.model, mask_prob=cfg.data.mask_prob, mask_length=cfg.data.mask_length)

    # --- shared front end ----------------------------------------------------------------------------
    @staticmethod
    def frame_padding_mask(padding_mask: torch.Tensor, frames: int) -> torch.Tensor:
        """Sample padding [B,L] -> frame padding [B,T] exactly as fairseq's ``forward_padding_mask``: drop
        the last L % T samples, cut the rest into T equal chunks; a frame is padding if its chunk is."""
        extra = padding_mask.size(1) % frames
        if extra:
            padding_mask = padding_mask[:, :-extra]
        return padding_mask.view(padding_mask.size(0), frames, -1).all(-1)

    def _front_end(self, wav: torch.Tensor, padding_mask: torch.Tensor | None):
        """(projected features [B,T,H] before masking, frame padding or None, feature penalty)."""
        if wav.dim() != 2 or not wav.is_floating_point():
            raise ValueError(f"waveforms must be a float tensor [batch, samples], got {wav.dtype} {tuple(wav.shape)}")
        if wav.size(1) < FRAME_LENGTH:
            raise ValueError(f"waveforms have {wav.size(1)} samples; the model needs at least {FRAME_LENGTH}")
        if padding_mask is not None and (padding_mask.shape != wav.shape or padding_mask.dtype != torch.bool):
            raise ValueError(f"padding_mask must be bool {tuple(wav.shape)}, got {padding_mask.dtype} "
                             f"{tuple(padding_mask.shape)}")
        mult = self.cfg.feature_grad_mult
        if mult > 0:
            features = self.feature_extractor(wav)
            if mult != 1.0:
                features = _GradMultiply.apply(features, mult)
        else:  # feature_grad_mult 0 freezes the CNN: no graph at all
            with torch.no_grad():
                features = self.feature_extractor(wav)
        penalty = features.float().pow(2).mean()
        features = self.layer_norm(features.transpose(1, 2))
        frame_padding = None if padding_mask is None else self.frame_padding_mask(padding_mask, features.size(1))
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        return self.dropout_input(features), frame_padding, penalty

    def extract_hidden_states(self, waveforms: torch.Tensor, padding_mask: torch.Tensor | None = None
                              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """No masking. (num_hidden_layers+1 tensors [B,T,H] as s3prl/HF hidden_states, frame padding [B,T])."""
        x, frame_padding, _ = self._front_end(waveforms, padding_mask)
        _, hidden = self.encoder(x, frame_padding, keep_hidden=True, checkpointing=self.gradient_checkpointing)
        return hidden, frame_padding

    # --- pretraining ---------------------------------------------------------------------------------
    def sample_mask(self, batch: int, frames: int, frame_padding: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
        """[B,T] bool. Each frame that leaves room for a whole span before the utterance's last unpadded
        frame starts a span of ``mask_length`` with probability ``mask_prob``; padding is never masked."""
        valid = torch.ones(batch, frames, dtype=torch.bool, device=device) if frame_padding is None else ~frame_padding
        lengths = valid.sum(1, keepdim=True)  # padding is at the end (right-padded batches)
        t = torch.arange(frames, device=device)
        last_start = (lengths - self.mask_length).clamp(min=0)
        starts = (torch.rand(batch, frames, device=device) < self.mask_prob) & (t <= last_start)
        # frame t is masked iff a span starts in [t - mask_length + 1, t]: a windowed count via cumsum
        count = starts.int().cumsum(1)
        window = count - F.pad(count, (self.mask_length, 0))[:, :frames]
        return (window > 0) & valid

    def check_targets(self, target_ids: torch.Tensor, waveforms: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``target_ids`` as long on ``x``'s device, checked against the frames of ``x`` [B,T,H] and the vocabulary."""
        B, T = x.shape[:2]
        if target_ids.shape != (B, T):
            raise ValueError(f"target_ids has shape {tuple(target_ids.shape)} but {waveforms.size(1)} samples give "
                             f"num_frames={num_frames(waveforms.size(1))} model frames: expected ({B}, {T})")
        target_ids = target_ids.to(device=x.device, dtype=torch.long)
        labelled = target_ids != IGNORE_INDEX
        if bool(((target_ids < 0) | (target_ids >= self.cfg.vocab_size))[labelled].any()):
            raise ValueError(f"target_ids must be in [0, {self.cfg.vocab_size}) or {IGNORE_INDEX}")
        return target_ids

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction-head logits: [N,H] -> [N,V] float32 cosine similarity to every label embedding / logit_temp (fairseq's
        logits over [positive, all labels] with the positive's duplicate at -inf are the same softmax)."""
        proj = self.final_proj(x)
        with torch.autocast(device_type=proj.device.type, enabled=False):
            a = F.normalize(proj.float(), dim=-1, eps=1e-8)
            b = F.normalize(self.label_embs_concat.float(), dim=-1, eps=1e-8)
            return a @ b.t() / self.cfg.logit_temp

    def encode(self, waveforms: torch.Tensor, padding_mask: torch.Tensor | None, *, mask: bool,
               keep_hidden: bool = False) -> EncoderOutput:
        """The training forward: front end, span masking (when ``mask``), Transformer. The frames of
        ``output.mask`` saw ``mask_emb`` instead of their features."""
        x, frame_padding, penalty = self._front_end(waveforms, padding_mask)
        B, T, _ = x.shape
        frame_mask = None
        if mask:
            frame_mask = self.sample_mask(B, T, frame_padding, x.device)
            x = torch.where(frame_mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        x, hidden = self.encoder(x, frame_padding, keep_hidden=keep_hidden, checkpointing=self.gradient_checkpointing)
        return EncoderOutput(x, hidden, frame_mask, frame_padding, penalty)

    def pretraining_step(self, waveforms: torch.Tensor, padding_mask: torch.Tensor | None, target_ids: torch.Tensor,
                         masked_weight: float = 1.0, unmasked_weight: float = 0.0,
                         feature_pen_weight: float = 10.0) -> PretrainOutput:
        """Masked prediction loss of one batch; ``target_ids`` [B,T] = cluster id + 4, or -100 to ignore."""
        out = self.encode(waveforms, padding_mask, mask=True)
        x, mask, frame_padding, penalty = out.x, out.mask, out.frame_padding, out.penalty
        target_ids = self.check_targets(target_ids, waveforms, x)
        labelled = target_ids != IGNORE_INDEX
        if frame_padding is not None:
            labelled &= ~frame_padding

        losses, stats = {}, {}
        for name, selected, weight in (("masked", mask & labelled, masked_weight),
                                       ("unmasked", ~mask & labelled, unmasked_weight)):
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):  # else metrics only
                logits = self.logits(x[selected])
                targets = target_ids[selected]
                losses[name] = F.cross_entropy(logits, targets, reduction="sum")
            stats[name] = (int(targets.numel()), int((logits.argmax(-1) == targets).sum()))

        n_masked, n_unmasked = stats["masked"][0], stats["unmasked"][0]
        sample_size = max(n_masked if masked_weight > 0 else n_unmasked, 1)  # fairseq's criterion
        weighted = [w * losses[n] for n, w in (("masked", masked_weight), ("unmasked", unmasked_weight)) if w > 0]
        loss = sum(weighted, penalty.new_zeros(())) / sample_size + feature_pen_weight * penalty
        masked_loss = losses["masked"].item() / max(n_masked, 1)
        metrics = {
            "loss": loss.item(),
            "masked_loss": masked_loss,
            "masked_accuracy": stats["masked"][1] / max(n_masked, 1),
            "unmasked_accuracy": stats["unmasked"][1] / max(n_unmasked, 1),
            "perplexity": math.exp(min(masked_loss, 50.0)),
            "feature_penalty": penalty.item(),
            "num_masked": float(n_masked),
            "num_unmasked": float(n_unmasked),
        }
        return PretrainOutput(loss=loss, metrics=metrics)
