"""PNG plots of robust accuracy (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _accuracy_plot(x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str,
                   title: str, clean_accuracy: float | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(list(x)[:len(values)], list(values), marker="o", label=label)
    if clean_accuracy is not None:
        ax.axhline(clean_accuracy, color="grey", linestyle="--", label="clean")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def robustness_curve_png(deltas: Sequence[float], series: dict[str, Sequence[float]],
                         clean_accuracy: float, title: str) -> bytes:
    """Accuracy against the radius δ, with the clean accuracy as a reference line."""
    return _accuracy_plot(deltas, series, xlabel="radius δ", ylabel="accuracy", title=title,
                          clean_accuracy=clean_accuracy)


def training_curve_png(epochs: Sequence[int], series: dict[str, Sequence[float]], title: str) -> bytes:
    """Held-out accuracies per epoch (epoch 0 = the model before fine-tuning)."""
    return _accuracy_plot(epochs, series, xlabel="epoch", ylabel="held-out accuracy", title=title)
