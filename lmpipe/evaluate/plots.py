"""Evaluation figures: confusion matrices, ROC overlay, reliability diagram, training curves.

Figures are built on the Agg canvas without pyplot (no global state, no display needed) and
saved by `save` with fixed size, dpi and no `Software` metadata, so the same data gives the
same PNG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 100
PNG_METADATA = {"Software": None}  # matplotlib writes its version here by default


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG whose bytes depend only on its content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)
    return path


def confusion_figure(cm: np.ndarray, label_names: Sequence[str], title: str) -> Figure:
    """Counts (and row shares) of a confusion matrix; rows = actual, columns = predicted."""
    k = len(label_names)
    fig = _figure(1.6 + 0.9 * k, 1.2 + 0.8 * k)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.1%}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(k), label_names, rotation=30 if k > 3 else 0)
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title}: confusion matrix", fontsize=10)
    return fig


def roc_figure(curves: Mapping[str, Sequence[tuple[str, np.ndarray, np.ndarray]]], aucs: Mapping[str, float]) -> Figure:
    """Binary: every model's ROC on one axes. Multiclass: one axes per model, a curve per class."""
    binary = all(len(c) <= 1 for c in curves.values())
    panels = 1 if binary else max(1, len(curves))
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = _figure(4.2 * cols, 3.8 * rows)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    for i, (model, model_curves) in enumerate(curves.items()):
        ax = axes[0 if binary else i]
        for label, fpr, tpr in model_curves:
            name = f"{model} (AUC {aucs[model]:.3f})" if binary else f"{label}"
            ax.plot(fpr, tpr, label=name, linewidth=1.2)
        if not binary:
            ax.set_title(f"{model}: one-vs-rest (macro AUC {aucs[model]:.3f})", fontsize=9)
    for ax in axes:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    if binary:
        axes[0].set_title("ROC on the test split", fontsize=10)
    return fig


def reliability_figure(probs: Mapping[str, np.ndarray], labels: np.ndarray, bins: int) -> Figure:
    """Accuracy against confidence per equal-width bin, every model on one axes."""
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8, label="perfect calibration")
    for model, p in probs.items():
        confidence = p.max(axis=1)
        correct = p.argmax(axis=1) == labels
        index = np.minimum((confidence * bins).astype(int), bins - 1)
        count = np.bincount(index, minlength=bins)
        used = count > 0
        mean_conf = np.bincount(index, confidence, bins)[used] / count[used]
        accuracy = np.bincount(index, correct.astype(float), bins)[used] / count[used]
        ax.plot(mean_conf, accuracy, marker="o", markersize=3, linewidth=1.2, label=model)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"Reliability ({bins} bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _curve_sources(reports_root: Path) -> dict[str, list[Path]]:
    sources: dict[str, list[Path]] = {}
    pretrain = sorted((reports_root / "pretrain").glob("*.csv"))
    if pretrain:
        sources["pretrain"] = pretrain
    for folder in sorted(p for p in (reports_root / "finetune").glob("*") if p.is_dir()):
        files = sorted(folder.glob("*.csv"))
        if files:
            sources[f"finetune_{folder.name}"] = files
    return sources


def curves_figure(name: str, frames: Mapping[str, Any]) -> Figure | None:
    """One panel per logged quantity (x = step); train `loss` and `val_loss` share a panel, and the
    unigram reference is drawn in the perplexity panel (the line a masked-LM must get under)."""
    series: dict[str, list[tuple[str, Any, Any]]] = {}
    for file, frame in frames.items():
        if "step" not in frame.columns:
            continue
        for column in frame.columns:
            if column == "step" or not np.issubdtype(frame[column].dtype, np.number):
                continue
            panel = {"val_loss": "loss", "unigram_perplexity": "val_perplexity"}.get(column, column)
            series.setdefault(panel, []).append((f"{column}", frame["step"], frame[column]))
    if not series:
        return None
    series = dict(sorted(series.items(), key=lambda item: item[0] != "loss"))  # loss panel first
    series.get("loss", []).sort(key=lambda line: line[0] != "loss")  # train loss, then val_loss
    cols = min(len(series), 4)
    rows = math.ceil(len(series) / cols)
    fig = _figure(3.4 * cols, 2.8 * rows)
    for i, (panel, lines) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, x, y in lines:
            ax.plot(x, y, marker="." if len(x) < 30 else None, linewidth=1.2, label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{name} training curves", fontsize=10)
    return fig


def training_curve_figures(reports_root: str | Path) -> dict[str, Figure]:
    """{name: figure} from reports/pretrain/*.csv and reports/finetune/<name>/*.csv, if any."""
    import pandas as pd

    out = {}
    for name, files in _curve_sources(Path(reports_root)).items():
        frames = {}
        for path in files:
            try:
                frames[path.name] = pd.read_csv(path)
            except (ValueError, OSError):  # an empty or malformed curve file: skip, not fail
                continue
        fig = curves_figure(name, frames)
        if fig is not None:
            out[name] = fig
    return out


def payoff_figure(frame: Any) -> Figure:
    """The pretraining-payoff study: accuracy difference (pretrained - random init) with its 95%
    interval against the pretraining budget, one line per label count; zero = no payoff."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for labels, group in frame.groupby(frame["labels"].astype(str), sort=False):
        group = group.groupby("budget", as_index=False)[["difference", "ci_low", "ci_high"]].mean()
        err = [group["difference"] - group["ci_low"], group["ci_high"] - group["difference"]]
        ax.errorbar(
            group["budget"],
            group["difference"],
            yerr=err,
            marker="o",
            capsize=3,
            linewidth=1.2,
            label=f"{labels} labels",
        )
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pretraining budget (x the default pretrain.loop.max_steps)", fontsize=8)
    ax.set_ylabel("test accuracy: pretrained - random init", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title("When does pretraining pay?", fontsize=10)
    return fig
