"""The evaluation's outputs: ``evaluation.json`` (everything), ``evaluation.md`` (the table) and
``evaluation.png`` (bar charts of the main probes), all written atomically; the table is also printed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedhubert.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

COLUMNS = ("row", "params", "compute", "SID best layer", "SID weighted", "EER", "keyword best layer",
           "keyword weighted", "masked acc (chance)", "masked loss", "min eff. rank", "max mean cos")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["rows"]:
        sid, sv, kw, h, mp = (r["speaker_id"], r["speaker_verification"], r["keyword"], r["health"],
                              r["masked_prediction"])
        rows.append([
            r["name"], f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "-",
            f"{r['compute_audio_hours']:.2f} h" if r["examples"] else "-",
            f"{_pct(sid['best_accuracy'])} (L{sid['best_layer']})", _pct(sid["weighted_accuracy"]),
            f"{_pct(sv['eer'])} (L{sv['best_layer']})",
            f"{_pct(kw['best_accuracy'])} (L{kw['best_layer']})", _pct(kw["weighted_accuracy"]),
            f"{_pct(mp['masked_accuracy'])} ({_pct(mp['chance'])})" if mp else "-",
            f"{mp['masked_loss']:.2f}" if mp else "-",
            f"{h['min_effective_rank']:.1f}", f"{h['max_mean_cosine']:.3f}"])
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The table with a legend: accuracies and EER in %, layer L0 = the CNN/projection output."""
    data = report["data"]
    sid_chance = report["rows"][0]["speaker_id"]["chance"] if report["rows"] else 0.0
    kw_chance = report["rows"][0]["keyword"]["chance"] if report["rows"] else 0.0
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    lines += ["", f"Speaker set: {data['speaker']['clips']} segments ({data['speaker']['seconds']:.0f} s) of "
              f"{data['speaker']['classes']} speakers, {data['speaker']['test_clips']} test segments (chance "
              f"{_pct(sid_chance)} %). Keyword set: {data['keyword']['clips']} clips of {data['keyword']['classes']} "
              f"words, {data['keyword']['test_clips']} from unseen voices (chance {_pct(kw_chance)} %).",
              "Accuracies and EER in %; (L<i>) the layer that scored best (L0 = CNN/projection output); "
              "compute = crops trained on x crop length; masked accuracy on each client's validation split with "
              "its own head, the majority-cluster share in brackets; effective rank and mean cosine: the "
              "representation-health figures (a collapsed encoder has a low rank and a cosine near 1)."]
    targets = report.get("targets", {})
    if targets:
        keys = sorted({k for entry in targets.values() for k in entry})
        lines += ["", "Targets: | " + " | ".join(["set", *keys]) + " |", "|" + "---|" * (len(keys) + 1)]
        for name, entry in targets.items():
            cells = [name] + [f"{entry[k]:.3f}" if isinstance(entry.get(k), float) else str(entry.get(k, "-"))
                              for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], target: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["rows"]]
    panels = (("speaker ID accuracy", lambda r: max(r["speaker_id"]["best_accuracy"], r["speaker_id"]["weighted_accuracy"])),
              ("speaker verification EER (lower is better)", lambda r: r["speaker_verification"]["eer"]),
              ("keyword accuracy, unseen voices", lambda r: max(r["keyword"]["best_accuracy"], r["keyword"]["weighted_accuracy"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (title, value) in zip(axes, panels):
        ax.bar(names, [value(r) for r in report["rows"]], color="tab:blue")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curves(report: dict[str, Any], target: Path) -> bool:
    """Validation masked accuracy against training compute of every row that has a curve (federated,
    centralized), each with its chance level dashed. False when no row has one."""
    rows = [r for r in report["rows"] if r.get("curve")]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    hours = report["crop_seconds"] / 3600
    for i, r in enumerate(rows):
        color = f"C{i}"
        x = [p["examples"] * hours for p in r["curve"]]
        ax.plot(x, [p["masked_accuracy"] for p in r["curve"]], "o-", color=color, label=r["name"])
        if all(p.get("chance") is not None for p in r["curve"]):
            ax.plot(x, [p["chance"] for p in r["curve"]], "--", color=color, alpha=0.6, label=f"{r['name']} chance")
    ax.set_xlabel("training compute (audio hours of crops)")
    ax.set_ylabel("validation masked accuracy")
    ax.set_title("masked accuracy against compute (each on its own targets)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evaluation.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    atomic_write_text(out / "evaluation.md", "# Evaluation\n\n" + table)
    plot(report, out / "evaluation.png")
    curves = plot_curves(report, out / "learning_curves.png")
    if not curves:  # an earlier run's curves must not sit beside this table
        (out / "learning_curves.png").unlink(missing_ok=True)
    print(table, flush=True)
    log.info("wrote %s, %s, %s%s", out / "evaluation.json", out / "evaluation.md", out / "evaluation.png",
             f" and {out / 'learning_curves.png'}" if curves else "")
