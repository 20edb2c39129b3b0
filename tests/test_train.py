"""train_local / evaluate_local / resolve_batch_size with a tiny HuBERT on real LibriSpeech crops."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedhubert.config import Config
from fedhubert.data import make_loader
from fedhubert.errors import ConfigError, TrainingError
from fedhubert.model import HubertBase
from fedhubert.memory import batch_from_budget, largest_fitting
from fedhubert.train import evaluate_local, pretraining_loss, resolve_batch_size, resolve_device, train_local
from tests.test_data_loader import build_client, tiny_config

CPU = torch.device("cpu")
NO_DROPOUT = ["model.hidden_dropout=0.0", "model.attention_dropout=0.0", "model.feat_proj_dropout=0.0",
              "model.dropout_features=0.0"]
TRAIN_KEYS = {"loss", "masked_accuracy", "unmasked_accuracy", "perplexity", "learning_rate", "steps",
              "num_examples", "samples_per_second", "audio_seconds_per_second", "peak_memory_mb", "train_time_s"}


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_client(tmp_path_factory.mktemp("fed"))


def new_model(cfg: Config, seed: int = 0) -> HubertBase:
    torch.manual_seed(seed)
    return HubertBase.from_config(cfg)


def train_loader(client_dir: Path, cfg: Config, seed: int = 0) -> torch.utils.data.DataLoader:
    return make_loader(client_dir, "train", cfg, batch_size=cfg.training.batch_size, seed=seed, train=True)


def eval_loader(client_dir: Path, cfg: Config, split: str = "valid") -> torch.utils.data.DataLoader:
    return make_loader(client_dir, split, cfg, batch_size=4, seed=0, train=False)


def test_train_local_reports_finite_metrics_and_respects_max_steps(client_dir: Path) -> None:
    cfg = tiny_config("training.local_epochs=3", "training.max_local_steps=4")
    metrics = train_local(new_model(cfg), train_loader(client_dir, cfg), cfg, CPU, seed=1)
    assert TRAIN_KEYS <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["steps"] == 4  # 3 epochs of 3 batches would be 9 steps
    assert metrics["num_examples"] == 3 + 3 + 1 + 3  # batches of 3, 3, 1, then the next epoch's first
    assert metrics["learning_rate"] == cfg.training.learning_rate
    assert 0 <= metrics["masked_accuracy"] <= 1 and metrics["num_masked"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["masked_loss"]))
    assert metrics["peak_memory_mb"] > 0 and metrics["samples_per_second"] > 0


def test_loss_decreases_over_repeated_local_training(client_dir: Path) -> None:
    cfg = tiny_config(*NO_DROPOUT, "training.learning_rate=0.002", "training.local_epochs=3")
    model = new_model(cfg)
    fit = eval_loader(client_dir, cfg, "train")
    before = evaluate_local(model, fit, cfg, CPU)
    rounds = [train_local(model, train_loader(client_dir, cfg, seed=r), cfg, CPU, seed=r)["loss"] for r in range(3)]
    after = evaluate_local(model, fit, cfg, CPU)
    assert rounds[-1] < rounds[0] - 0.1, rounds
    assert after["loss"] < before["loss"] - 0.1, (before, after)


def test_training_is_deterministic_given_the_seed_and_leaves_global_rng_alone(client_dir: Path) -> None:
    cfg = tiny_config("training.max_local_steps=2")  # dropout on: the seed must cover it

    def run(seed: int) -> tuple[dict, dict]:
        model = new_model(cfg)
        metrics = train_local(model, train_loader(client_dir, cfg, seed=5), cfg, CPU, seed=seed)
        return metrics, model.state_dict()

    torch.manual_seed(99)
    rng = torch.get_rng_state()
    (m1, s1), (m2, s2), (m3, _) = run(1), run(1), run(2)
    assert m1["loss"] == m2["loss"] and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m1["loss"] != m3["loss"]
    torch.manual_seed(99)
    assert torch.equal(rng, torch.get_rng_state())  # sanity of the comparison below
    model = new_model(cfg)
    torch.manual_seed(99)
    train_local(model, train_loader(client_dir, cfg), cfg, CPU, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)


def test_warmup_scales_the_learning_rate(client_dir: Path) -> None:
    cfg = tiny_config("training.warmup_steps=8", "training.max_local_steps=2", "training.weight_decay=0.0")
    assert train_local(new_model(cfg), train_loader(client_dir, cfg), cfg, CPU, seed=0)["learning_rate"] == \
        pytest.approx(cfg.training.learning_rate * 2 / 8)

    def weight_change(warmup: int) -> float:
        c = tiny_config(f"training.warmup_steps={warmup}", "training.max_local_steps=2", "training.weight_decay=0.0")
        model = new_model(c)
        start = [p.detach().clone() for p in model.parameters()]
        train_local(model, train_loader(client_dir, c), c, CPU, seed=0)
        return sum((p.detach() - s).abs().sum().item() for p, s in zip(model.parameters(), start))

    assert weight_change(1_000_000) < 1e-3 * weight_change(0)  # lr ~ 2e-6 of the peak: almost no step


def test_gradient_clipping_bounds_the_applied_gradient(client_dir: Path) -> None:
    def final_grad_norm(clip: float) -> tuple[float, float]:
        cfg = tiny_config(f"training.grad_clip_norm={clip}", "training.max_local_steps=1")
        model = new_model(cfg)
        metrics = train_local(model, train_loader(client_dir, cfg), cfg, CPU, seed=0)
        applied = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        return metrics["grad_norm"], applied.item()

    raw, applied = final_grad_norm(0.0)
    assert applied == pytest.approx(raw, rel=1e-4) and raw > 1e-3
    raw_clipped, applied_clipped = final_grad_norm(1e-3)
    assert raw_clipped == pytest.approx(raw, rel=1e-4) and applied_clipped == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_runs_on_cpu_and_fp16_is_refused(client_dir: Path) -> None:
    cfg = tiny_config("training.precision=bf16", "training.max_local_steps=2")
    metrics = train_local(new_model(cfg), train_loader(client_dir, cfg), cfg, CPU, seed=0)
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 2
    cfg16 = tiny_config("training.precision=fp16")
    with pytest.raises(ConfigError, match="training.precision"):
        train_local(new_model(cfg16), train_loader(client_dir, cfg16), cfg16, CPU, seed=0)


def test_gradient_checkpointing_follows_config_and_keeps_the_result(client_dir: Path) -> None:
    plain = tiny_config(*NO_DROPOUT, "training.max_local_steps=2")
    ckpt = tiny_config(*NO_DROPOUT, "training.max_local_steps=2", "training.gradient_checkpointing=true")
    model = new_model(ckpt)
    with_ckpt = train_local(model, train_loader(client_dir, ckpt), ckpt, CPU, seed=0)
    assert model.gradient_checkpointing is True
    without = train_local(new_model(plain), train_loader(client_dir, plain), plain, CPU, seed=0)
    assert with_ckpt["loss"] == pytest.approx(without["loss"], rel=1e-5)


def test_non_finite_loss_raises_training_error_naming_the_step(client_dir: Path) -> None:
    cfg = tiny_config("training.max_local_steps=3")
    default, calls = pretraining_loss(cfg), []

    def poisoned(model: torch.nn.Module, batch) -> SimpleNamespace:
        out = default(model, batch)
        calls.append(1)
        return SimpleNamespace(loss=out.loss * (math.nan if len(calls) == 2 else 1.0), metrics=out.metrics)

    with pytest.raises(TrainingError, match="loss became nan at local step 2"):
        train_local(new_model(cfg), train_loader(client_dir, cfg), cfg, CPU, seed=0, loss_fn=poisoned)
    wild = tiny_config("training.learning_rate=1e30", "training.grad_clip_norm=0.0", "training.max_local_steps=3")
    with pytest.raises(TrainingError, match="step [23]"):  # a real divergence, caught on the next step
        train_local(new_model(wild), train_loader(client_dir, wild), wild, CPU, seed=0)


def test_evaluate_local_is_deterministic_and_restores_the_mode(client_dir: Path) -> None:
    cfg = tiny_config()
    model = new_model(cfg)
    model.train()
    loader = eval_loader(client_dir, cfg)
    first, second = evaluate_local(model, loader, cfg, CPU), evaluate_local(model, loader, cfg, CPU)
    assert first == second and model.training
    assert first["num_examples"] == 2 and first["num_masked"] > 0
    assert {"loss", "masked_accuracy", "unmasked_accuracy", "perplexity"} <= first.keys()
    assert evaluate_local(model, loader, cfg, CPU, seed=1) != first  # the seed drives the masks


def test_resolve_device_and_fixed_batch_size() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="training.device"):
            resolve_device("cuda")
    cfg = tiny_config("training.batch_size=5")
    assert resolve_batch_size(cfg, new_model(cfg), CPU) == 5


def test_auto_batch_size_fits_the_budget_on_cpu() -> None:
    cfg = tiny_config("training.batch_size=auto")
    model = new_model(cfg)
    size = resolve_batch_size(cfg, model, CPU)
    assert isinstance(size, int) and 1 <= size <= 64
    assert resolve_batch_size(cfg, model, CPU, num_examples=3) <= 3
    tiny = tiny_config("training.batch_size=auto", "training.memory_budget_gb=0.001")
    roomy = tiny_config("training.batch_size=auto", "training.memory_budget_gb=4.0")
    small, large = resolve_batch_size(tiny, model, CPU), resolve_batch_size(roomy, model, CPU)
    assert small == 1 and 1 <= small <= large
    # The arithmetic behind it: more budget never gives a smaller batch; the cap holds.
    sizes = [batch_from_budget(b * 2**20, 50 * 2**20, 10 * 2**20, 64) for b in (10, 60, 100, 300, 10_000)]
    assert sizes == [1, 1, 5, 25, 64]


def test_empty_splits_evaluate_to_zero_examples_and_refuse_training(client_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "valid.tsv").write_text((client_dir / "valid.tsv").read_text().splitlines()[0] + "\n")
    (tmp_path / "valid.km").write_text("")
    cfg = tiny_config()
    loader = make_loader(tmp_path, "valid", cfg, batch_size=2, seed=0, train=True)
    assert evaluate_local(new_model(cfg), loader, cfg, CPU)["num_examples"] == 0
    with pytest.raises(TrainingError, match="valid.tsv"):
        train_local(new_model(cfg), loader, cfg, CPU, seed=0)


def test_auto_batch_probe_leaves_the_model_and_rng_untouched() -> None:
    cfg = tiny_config("training.batch_size=auto", "model.layerdrop=0.5")
    model = new_model(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    resolve_batch_size(cfg, model, CPU)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and model.encoder.layerdrop == 0.5
    assert all(p.grad is None for p in model.parameters())


def test_gpu_probe_search_finds_the_largest_fitting_batch() -> None:
    """The doubling + bisection search the GPU probe runs (its predicate here is a plain limit)."""
    for cap in (1, 5, 64):
        for limit in range(0, 70):
            calls: list[int] = []
            found = largest_fitting(lambda b: calls.append(b) or b <= limit, cap)
            assert found == min(limit, cap) and max(calls) <= cap and len(calls) <= 2 * cap.bit_length() + 1
