"""Per-round metrics of a federated run: JSON lines, TensorBoard scalars, PNG curves, console lines."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedhubert.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CURVES = (("loss", "loss"), (("masked_accuracy", "masked_chance"), "masked accuracy (and chance)"),
          ("perplexity", "perplexity"))
HEALTH_CURVES = ((("health_rank_first", "health_rank_mid", "health_rank_last"), "effective rank (validation)"),
                 (("health_cos_first", "health_cos_mid", "health_cos_last"), "mean cosine of 0.5 s embeddings"))
# validation figures of the distillation shown on the console line, when present
DISTILLATION_FIGURES = (("masked_kd_loss", "kd"), ("masked_ce_loss", "ce"), ("hidden_loss", "hidden"),
                        ("masked_agreement", "agree"))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrites ``path`` atomically with one JSON line per record (a resumed or rerun stage rewrites it whole)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class RunMetrics:
    """Keeps the run's history (one dict per round; round 0 = the initial model) and writes it out.

    The history is also stored in every checkpoint, so a resumed run rewrites the same files."""

    def __init__(self, out_dir: Path, history: list[dict[str, Any]] | None = None,
                 curves: tuple[tuple[str, str], ...] = CURVES) -> None:
        self.out_dir, self.curves = out_dir, curves
        self.history: list[dict[str, Any]] = list(history or [])
        self._writer = None

    def _tensorboard(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter  # imported late: only the server writes it
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        return self._writer

    def add(self, record: dict[str, Any]) -> None:
        """Appends one round's record, rewrites metrics.jsonl atomically, logs scalars."""
        self.history.append(record)
        write_jsonl(self.out_dir / "metrics.jsonl", self.history)
        writer = self._tensorboard()
        for split in ("train", "val"):
            for key, value in record.get(split, {}).items():
                writer.add_scalar(f"{split}/{key}", value, record["round"])
        for key in ("round_time_s", "bytes_total", "clients_succeeded", "clients_failed"):
            if key in record:
                writer.add_scalar(f"round/{key}", record[key], record["round"])
        for key, value in record.get("privacy", {}).items():  # epsilon spent so far, noise std, clipped clients
            writer.add_scalar(f"privacy/{key}", value, record["round"])
        writer.flush()
        log.info(progress_line(record))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def plot(self) -> Path:
        """curves.png: train and validation curves over rounds."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, axes = plt.subplots(1, len(self.curves), figsize=(5 * len(self.curves), 3.6))
        for ax, (keys, title) in zip(axes, self.curves):
            keys = (keys,) if isinstance(keys, str) else keys
            for key in keys:  # one line per key and split; several keys: label by key
                for split, style in (("train", "o-"), ("val", "s--")):
                    points = [(r["round"], r[split][key]) for r in self.history if key in r.get(split, {})]
                    if points:
                        ax.plot(*zip(*points), style, label=split if len(keys) == 1 else f"{split} {key}")
            collapsed = [r["round"] for r in self.history if r.get("collapsed")]
            for rnd in collapsed:
                ax.axvline(rnd, color="red", alpha=0.3)
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
        fig.tight_layout()
        target = self.out_dir / "curves.png"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return target


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def progress_line(record: dict[str, Any]) -> str:
    """The one console line per round."""
    train, val = record.get("train", {}), record.get("val", {})
    parts = [f"round {record['round']}"]
    if train:
        parts.append(f"train loss {_fmt(train.get('loss'))} acc {_fmt(train.get('masked_accuracy'))}")
    if val:
        chance = f" (chance {_fmt(val['masked_chance'])})" if "masked_chance" in val else ""
        parts.append(f"val loss {_fmt(val.get('loss'))} acc {_fmt(val.get('masked_accuracy'))}{chance}")
        if "health_rank_first" in val:
            ranks = "/".join(_fmt(val[f"health_rank_{w}"]) for w in ("first", "mid", "last"))
            parts.append(f"rank {ranks} cos {_fmt(max(val[f'health_cos_{w}'] for w in ('first', 'mid', 'last')))}")
        extras = [f"{name} {_fmt(val[key])}" for key, name in DISTILLATION_FIGURES if key in val]
        if extras:
            parts.append(" ".join(extras))
    if "clients_sampled" in record:
        parts.append(f"clients {record['clients_succeeded']}/{record['clients_sampled']} ok")
    if "privacy" in record:
        figures = record["privacy"]
        adaptive = f" C {_fmt(figures['clipping_norm'])}" if "next_clipping_norm" in figures else ""  # the C it used
        parts.append(f"eps {_fmt(figures['epsilon'])} (delta {figures['delta']:g}){adaptive}")
    if "bytes_total" in record:
        parts.append(f"{record['bytes_total'] / 2**20:.1f} MiB")
    if "round_time_s" in record:
        parts.append(f"{record['round_time_s']:.1f} s")
    if record.get("collapsed"):
        parts.append("COLLAPSED")
    return " | ".join(parts)
