"""The local training loop of a client, shared by pretraining and distillation.

The loss is pluggable: ``loss_fn(model, batch)`` returns an object with ``.loss`` (scalar tensor)
and ``.metrics`` (dict of floats). The default calls ``model.pretraining_step``; distillation passes
its own. Every call is deterministic given its seed and leaves the caller's global RNGs untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fedhubert.config import Config
from fedhubert.data import Batch, derive_seed, synthetic_batch
from fedhubert.errors import ConfigError, TrainingError
from fedhubert.memory import (MiB, PeakMemory, batch_from_budget, largest_fitting, memory_budget, process_peak_mb,
                              reset_rss_peak)

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Batch], Any]  # -> object with .loss and .metrics
MAX_AUTO_BATCH = 64  # batch_size=auto never goes above this (larger batches change the optimisation)
COUNT_KEYS = ("num_masked", "num_unmasked")  # summed over batches, not averaged


# --- Devices, precision, seeding -------------------------------------------------------------------

def parse_device(name: str) -> torch.device:
    """training.device as a torch.device, on any machine: 'auto' (cuda when available), 'cpu' or 'cuda[:N]';
    anything else is a one-line ConfigError naming the key (the deployment's server checks only this: its
    clients may have GPUs it lacks)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # torch knows mps, xla, meta...: we train on neither
        raise ConfigError(f"training.device: unknown device {name!r} (use auto, cpu or cuda[:N])")
    return device


def resolve_device(name: str) -> torch.device:
    """:func:`parse_device`, checked to exist on this machine."""
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {name!r} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"training.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of training.precision; fp16 needs CUDA (it needs a GradScaler)."""
    precision = cfg.training.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"training.precision=fp16 needs a CUDA device (got {device}); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_device(cfg: Config) -> torch.device:
    """training.device and training.precision on this machine, as the clients will resolve them: the
    scripts call it with the config checks, so that a device or precision the machine lacks stops
    before anything is written or started, in one line naming the key."""
    device = resolve_device(cfg.training.device)
    autocast(cfg, device)
    return device


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds torch, numpy and python RNGs (dropout, masking) for the block, then restores them."""
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def pretraining_loss(cfg: Config) -> LossFn:
    """The default loss: HuBERT's masked prediction with cfg.training's weights."""
    t = cfg.training

    def loss_fn(model: torch.nn.Module, batch: Batch) -> Any:
        return model.pretraining_step(batch.waveforms, batch.padding_mask, batch.target_ids,
                                      masked_weight=t.pred_masked_weight, unmasked_weight=t.pred_nomask_weight,
                                      feature_pen_weight=t.feature_pen_weight)
    return loss_fn


# --- batch_size=auto --------------------------------------------------

@contextlib.contextmanager
def _without_layerdrop(model: torch.nn.Module) -> Iterator[None]:
    """Layerdrop off while probing: a skipped layer would hide the memory of a full step."""
    saved = [(m, m.layerdrop) for m in model.modules() if isinstance(getattr(m, "layerdrop", None), float)]
    for m, _ in saved:
        m.layerdrop = 0.0
    try:
        yield
    finally:
        for m, value in saved:
            m.layerdrop = value


def _probe_step(model: torch.nn.Module, cfg: Config, device: torch.device, loss_fn: LossFn, batch_size: int) -> None:
    """One training fwd+bwd of ``batch_size`` full crops, leaving no gradients behind."""
    batch = synthetic_batch(cfg, batch_size).to(device)
    with _without_layerdrop(model):
        try:
            with autocast(cfg, device):
                out = loss_fn(model, batch)
            out.loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            del batch


def _probe(model: torch.nn.Module, cfg: Config, device: torch.device, loss_fn: LossFn, batch_size: int) -> int:
    """Bytes one training fwd+bwd of ``batch_size`` full crops needs above the resting model."""
    with PeakMemory(device) as mem:
        _probe_step(model, cfg, device, loss_fn, batch_size)
    return mem.peak_bytes


@dataclasses.dataclass(frozen=True)
class AutoBatch:
    """batch_size=auto's choice and the figures behind it (bytes): the peak it predicts for training at
    ``size`` is ``fixed + per_sample * size + optimizer``."""
    size: int
    budget: float
    fixed: float
    per_sample: float
    optimizer: float  # AdamW's two moments plus its step temporaries

    @property
    def predicted_peak(self) -> float:
        return self.fixed + self.per_sample * self.size + self.optimizer


def resolve_batch_size(cfg: Config, model: torch.nn.Module, device: torch.device, *,
                       num_examples: int | None = None, loss_fn: LossFn | None = None) -> int:
    """training.batch_size, or for 'auto' the largest batch whose fwd+bwd (plus AdamW state) fits
    the memory budget (:func:`plan_auto_batch`)."""
    if cfg.training.batch_size != "auto":
        return int(cfg.training.batch_size)
    return plan_auto_batch(cfg, model, device, num_examples=num_examples, loss_fn=loss_fn).size


def plan_auto_batch(cfg: Config, model: torch.nn.Module, device: torch.device, *,
                    num_examples: int | None = None, loss_fn: LossFn | None = None) -> AutoBatch:
    """The largest batch whose fwd+bwd plus AdamW's state fits 90% of the memory budget: probed at
    doubling sizes on GPU, a line through a 1- and a 3-crop probe on CPU. Capped at MAX_AUTO_BATCH and
    at ``num_examples`` (the dataset size) when given."""
    device = torch.device(device)
    loss_fn = loss_fn or pretraining_loss(cfg)
    cap = max(1, min(MAX_AUTO_BATCH, num_examples or MAX_AUTO_BATCH))
    optimizer = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    budget = memory_budget(cfg, device)
    usable = 0.9 * budget - optimizer  # 10% margin
    was_training = model.training
    model.to(device).train()
    _set_checkpointing(model, cfg)
    try:
        with seeded(derive_seed(cfg.seed, "batch-probe"), device):
            if device.type == "cuda":
                size, per_sample = _probe_cuda(model, cfg, device, loss_fn, usable, cap)
                fixed = 0.0
            else:
                fixed, per_sample = _probe_cpu(model, cfg, device, loss_fn)
                size = batch_from_budget(usable, fixed, per_sample, cap)
    finally:
        model.train(was_training)
    log.info("batch_size=auto -> %d on %s (budget %.2f GiB, ~%.0f MiB per %d-sample crop, cap %d)",
             size, device, budget / 2**30, per_sample / MiB, cfg.data.max_audio_length, cap)
    return AutoBatch(size, budget, fixed, per_sample, optimizer)


def _probe_cpu(model: torch.nn.Module, cfg: Config, device: torch.device, loss_fn: LossFn) -> tuple[float, float]:
    """(fixed, per crop) bytes: the process's peak RSS above its resting level after a 1- and then a
    3-crop probe, read in one window. One-time costs (code paged in, AdamW's first-step machinery,
    allocator arenas) land in ``fixed``, not in the slope; and memory the larger probe reuses from the
    smaller still counts. Two probes each measured from their own start (the old way) saw only what
    the 2-crop probe added to what the 1-crop probe had left in the allocator: a slope of 1-29 MiB a
    crop where one needs 35-46 (the demo model, 1-2 s crops), so 'auto' ran up to 2.4x past the budget."""
    peaks = {}
    with PeakMemory(device) as mem:
        _warm_optimizer()
        for b in (1, 3):
            _probe_step(model, cfg, device, loss_fn, b)
            peaks[b] = mem.so_far()
    per_sample = (peaks[3] - peaks[1]) / 2
    per_sample = max(per_sample, peaks[3] / 6)  # a flat reading (noise) errs on the safe side
    return max(0.0, peaks[3] - 3 * per_sample), per_sample


def _warm_optimizer() -> None:
    """One AdamW step on a throwaway tensor: what its first step loads (modules, kernels: ~120 MiB of
    RSS on CPU) is then part of the probe's fixed cost, as it will be of training's."""
    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.zeros(1)
    torch.optim.AdamW([param]).step()


def _probe_cuda(model: torch.nn.Module, cfg: Config, device: torch.device, loss_fn: LossFn,
                usable: float, cap: int) -> tuple[int, float]:
    """Doubles the batch until it runs out of memory or budget, then bisects the last gap."""
    peaks: dict[int, float] = {}

    def fits(b: int) -> bool:
        try:
            peaks[b] = _probe(model, cfg, device, loss_fn, b)
        except torch.cuda.OutOfMemoryError:
            peaks[b] = math.inf
        torch.cuda.empty_cache()  # after the except block, once the traceback's tensors are gone
        return peaks[b] <= usable

    size = largest_fitting(fits, cap)
    if size == 0:
        log.warning("batch_size=auto: one crop of %d samples already exceeds the memory budget",
                    cfg.data.max_audio_length)
        return 1, peaks[1]
    return size, peaks[size] / size


# --- Training and evaluation -----------------------------------------------------------------------

class MetricMeter:
    """Averages per-batch metrics: accuracies/losses of masked (unmasked) frames weighted by their
    frame counts when the loss reports them, everything else by batch size; counts are summed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.num_examples = 0

    def add(self, loss: float, metrics: dict[str, Any], batch_size: int) -> None:
        self.num_examples += batch_size
        metrics = {**{k: float(v) for k, v in metrics.items()}, "loss": loss}
        for key, value in metrics.items():
            if key in COUNT_KEYS:
                self.counts[key] += value
                continue
            weight = batch_size
            if key.startswith("masked_") and "num_masked" in metrics:
                weight = metrics["num_masked"]
            elif key.startswith("unmasked_") and "num_unmasked" in metrics:
                weight = metrics["num_unmasked"]
            self.sums[key] += value * weight
            self.weights[key] += weight

    def result(self) -> dict[str, float]:
        out = {k: (self.sums[k] / self.weights[k] if self.weights[k] > 0 else 0.0) for k in self.sums}
        out.update(self.counts)
        if "masked_loss" in out:  # perplexity of the masked predictions, over the whole pass
            out["perplexity"] = math.exp(out["masked_loss"]) if out["masked_loss"] < 700 else float("inf")
        out["num_examples"] = float(self.num_examples)
        return out


def _learning_rate(cfg: Config, step: int) -> float:
    """Peak learning rate after a linear warm-up over training.warmup_steps (step counts from 1)."""
    warmup = cfg.training.warmup_steps
    return cfg.training.learning_rate * (min(1.0, step / warmup) if warmup > 0 else 1.0)


def _batches(loader: torch.utils.data.DataLoader, epochs: int, max_steps: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, step from 1, batch) over ``epochs`` passes, stopping after ``max_steps`` when > 0."""
    step = 0
    for epoch in range(epochs):
        for batch in loader:
            step += 1
            yield epoch, step, batch
            if 0 < max_steps <= step:
                return


def _set_checkpointing(model: torch.nn.Module, cfg: Config) -> None:
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.training.gradient_checkpointing
    elif cfg.training.gradient_checkpointing:
        raise ConfigError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")


def train_local(model: torch.nn.Module, loader: torch.utils.data.DataLoader, cfg: Config,
                device: torch.device | str, *, seed: int, loss_fn: LossFn | None = None) -> dict[str, float]:
    """training.local_epochs passes over ``loader`` (at most training.max_local_steps steps when
    > 0) with AdamW, linear warm-up, clipping and autocast. Returns averaged metrics."""
    t, device = cfg.training, torch.device(device)
    loss_fn = loss_fn or pretraining_loss(cfg)
    model.to(device).train()
    _set_checkpointing(model, cfg)
    autocast(cfg, device)  # checks training.precision before any work
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=_learning_rate(cfg, 1), weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16")
    meter, step, lr, audio_samples = MetricMeter(), 0, 0.0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_rss_peak()  # the peak RSS of this call, not of the process's whole life
    started = time.perf_counter()
    with seeded(derive_seed(seed, "train"), device):
        for epoch, step, batch in _batches(loader, t.local_epochs, t.max_local_steps):
            lr = _learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch.to(device)
            with autocast(cfg, device):
                out = loss_fn(model, batch)
            loss = out.loss.float()
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at local step {step} (epoch {epoch + 1}); "
                                    f"lower training.learning_rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm if t.grad_clip_norm > 0 else math.inf)
            if not torch.isfinite(norm) and not scaler.is_enabled():  # fp16 skips such steps itself
                raise TrainingError(f"gradient norm became {norm.item()} at local step {step} (epoch {epoch + 1})")
            scaler.step(optimizer)
            scaler.update()
            extra = {"grad_norm": norm.item()} if torch.isfinite(norm) else {}  # fp16 overflow steps
            meter.add(loss.item(), {**out.metrics, **extra}, len(batch))
            audio_samples += sum(batch.num_samples)
    if step == 0:
        raise TrainingError(f"no training batches: {getattr(loader.dataset, 'tsv', 'the loader')} is empty")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    metrics = meter.result()
    metrics.update(learning_rate=lr, steps=float(step), train_time_s=elapsed,
                   samples_per_second=meter.num_examples / elapsed,
                   audio_seconds_per_second=audio_samples / cfg.data.sample_rate / elapsed,
                   peak_memory_mb=process_peak_mb(device))
    return metrics


@torch.no_grad()
def evaluate_local(model: torch.nn.Module, loader: torch.utils.data.DataLoader, cfg: Config,
                   device: torch.device | str, loss_fn: LossFn | None = None, *,
                   seed: int | None = None, observe: Callable[[Batch], None] | None = None) -> dict[str, float]:
    """Loss and accuracies over ``loader`` in eval mode. Masking is seeded (``seed``, default
    cfg.seed), so the same model and data give the same numbers every round. An empty loader gives
    num_examples 0 and zero metrics. ``observe`` sees every batch (on the device) after the loss, so
    other figures can share the pass instead of decoding the audio again."""
    device = torch.device(device)
    loss_fn = loss_fn or pretraining_loss(cfg)
    was_training = model.training
    model.to(device).eval()
    meter = MetricMeter()
    with seeded(derive_seed(cfg.seed if seed is None else seed, "eval"), device), autocast(cfg, device):
        for batch in loader:
            batch = batch.to(device)
            out = loss_fn(model, batch)
            meter.add(float(out.loss), out.metrics, len(batch))
            if observe is not None:
                observe(batch)
    model.train(was_training)
    result = meter.result()
    for key in ("loss", "masked_accuracy", "unmasked_accuracy", "perplexity"):
        result.setdefault(key, 0.0)
    return result
