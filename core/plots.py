"""PNG plots of robust accuracy (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def robustness_curve_png(deltas: Sequence[float], series: dict[str, Sequence[float]],
                         clean_accuracy: float, title: str) -> bytes:
    """Accuracy against the radius δ (in units of 1/255 for l∞ ground cost)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(list(deltas)[:len(values)], list(values), marker="o", label=label)
    ax.axhline(clean_accuracy, color="grey", linestyle="--", label="clean")
    ax.set_xlabel("radius δ")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def training_curve_png(epochs: Sequence[int], series: dict[str, Sequence[float]], title: str) -> bytes:
    """Held-out accuracies per epoch (epoch 0 = the model before fine-tuning)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(list(epochs), list(values), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
