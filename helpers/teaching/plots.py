"""Plots the notebooks show and the runner saves (loss curve, confusion matrix, sample grid).

Each function returns the matplotlib figure and, given ``path``, also saves it as a PNG.
Taught in notebooks 04 and 05.

Every text that carries a class name, a prediction or a caller's title is drawn as written (``LITERAL``):
matplotlib would otherwise read text between two ``$`` as math, so a class called ``$5 note`` or ``x^$``
would be mangled or stop the figure from saving.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "inline"):
    matplotlib.use("Agg")  # headless (papermill, CI) unless a notebook front end chose its own
import matplotlib.pyplot as plt
import numpy as np

LITERAL = {"parse_math": False}  # matplotlib Text property: no mathtext, the string as it is


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_loss(loss_history, path=None, title="Training loss"):
    """Loss per logged step: ``[(step, loss), ...]``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if loss_history:
        steps, losses = zip(*loss_history)
        ax.plot(steps, losses, marker=".", lw=1)
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="loss (labelled tokens)")
    ax.set_title(title, **LITERAL)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(matrix, class_names, path=None, title="Confusion matrix (fine-tuned, constrained)"):
    """Rows are true classes, columns predicted ones; counts are written in the cells when few."""
    n = len(class_names)
    size = max(4.5, 0.28 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 12 else 9, **LITERAL)
    ax.set_yticks(range(n), class_names, fontsize=7 if n > 12 else 9, **LITERAL)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, **LITERAL)
    if n <= 15:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, int(count), ha="center", va="center",
                        color="white" if count > matrix.max() / 2 else "black", fontsize=8)
    return _save(fig, path)


def plot_sample_grid(examples, class_names, predictions=None, path=None, columns: int = 6, title=None):
    """Images with their true labels and, given ``predictions``, the predicted ones (wrong ones in red)."""
    rows = max(1, int(np.ceil(len(examples) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, example) in enumerate(zip(axes.flat, examples)):
        true = class_names[example["label"]]
        ax.imshow(example["image"])
        if predictions is None:
            ax.set_title(f"true: {true}", fontsize=8, **LITERAL)
        else:
            ax.set_title(f"true: {true}\npred: {predictions[k]}", fontsize=8,
                         color="black" if predictions[k] == true else "crimson", **LITERAL)
    if title:
        fig.suptitle(title, **LITERAL)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_bars(metrics: dict, path=None, title="Held-out accuracy"):
    """Baseline vs fine-tuned, constrained scoring vs generation."""
    systems = list(metrics)
    methods = ["constrained", "generation"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, method in enumerate(methods):
        values = [metrics[s][method]["accuracy"] or 0 for s in systems]
        bars = ax.bar(np.arange(len(systems)) + (k - 0.5) * width, values, width, label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(systems)), systems, **LITERAL)
    ax.set(ylim=(0, 1.05), ylabel="accuracy")
    ax.set_title(title, **LITERAL)
    ax.legend()
    return _save(fig, path)
