"""PNG plots of robust accuracy (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class CorruptionBars:
    """Mean accuracy per corruption type (over its measured severities) of one or more models."""

    types: list[str]
    series: dict[str, list[float | None]]       # label → one accuracy per type (None: not measured)
    clean: dict[str, float | None]              # label → its clean accuracy on the same images

    @classmethod
    def of(cls, blocks: Mapping[str, Mapping[str, Any] | None]) -> CorruptionBars | None:
        """From report corruption blocks by label (e.g. {"input model": before, "fine-tuned": after});
        None when no block has a measured type."""
        present = {label: b for label, b in blocks.items() if isinstance(b, Mapping) and b.get("per_type")}
        if not present:
            return None
        # every type asked, a type with no measured severity among them (shown as such, with no bar)
        types = list(dict.fromkeys([t for b in present.values() for t in b.get("types", [])]
                                   + [row["type"] for b in present.values() for row in b["per_type"]]))
        series = {label: [next((r["accuracy"] for r in b["per_type"] if r["type"] == t), None) for t in types]
                  for label, b in present.items()}
        return cls(types, series, {label: b.get("clean_accuracy") for label, b in present.items()})


def _accuracy_axes(ax: Axes, x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str,
                   title: str, clean_accuracy: float | None = None) -> None:
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


def _corruption_axes(ax: Axes, bars: CorruptionBars) -> None:
    """Horizontal bars, one group per corruption type, one bar per model; dotted clean accuracies."""
    k = len(bars.series)
    height = 0.8 / k
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (label, values) in enumerate(bars.series.items()):
        ys = [i - 0.4 + height * (j + 0.5) for i in range(len(bars.types))]
        ax.barh(ys, [v if v is not None else 0.0 for v in values], height=height, label=label,
                color=colours[j % len(colours)])
        clean = bars.clean.get(label)
        if clean is not None:
            ax.axvline(clean, color=colours[j % len(colours)], linestyle=":", linewidth=1)
    measured = [any(values[i] is not None for values in bars.series.values()) for i in range(len(bars.types))]
    ax.set_yticks(range(len(bars.types)), [t.replace("_", " ") + ("" if ok else " (skipped)")
                                           for t, ok in zip(bars.types, measured, strict=True)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("accuracy (mean over severities; dotted: clean)")
    ax.set_title("common corruptions")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize="small")


def _figure(corruptions: CorruptionBars | None) -> tuple[Figure, Axes, Axes | None]:
    if corruptions is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        return fig, ax, None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.3 * len(corruptions.types) + 1)),
                                      gridspec_kw={"width_ratios": [1, 1]})
    return fig, left, right


def _accuracy_plot(x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str,
                   title: str, clean_accuracy: float | None = None, corruptions: CorruptionBars | None = None) -> bytes:
    fig, ax, side = _figure(corruptions)
    _accuracy_axes(ax, x, series, xlabel=xlabel, ylabel=ylabel, title=title, clean_accuracy=clean_accuracy)
    if side is not None and corruptions is not None:
        _corruption_axes(side, corruptions)
    return _png(fig)


def robustness_curve_png(deltas: Sequence[float], series: dict[str, Sequence[float]],
                         clean_accuracy: float, title: str, *, corruptions: CorruptionBars | None = None) -> bytes:
    """Accuracy against the radius δ, with the clean accuracy as a reference line; beside it, when
    given, the accuracy per corruption type."""
    return _accuracy_plot(deltas, series, xlabel="radius δ", ylabel="accuracy", title=title,
                          clean_accuracy=clean_accuracy, corruptions=corruptions)


def training_curve_png(epochs: Sequence[int], series: dict[str, Sequence[float]], title: str, *,
                       corruptions: CorruptionBars | None = None) -> bytes:
    """Held-out accuracies per epoch (epoch 0 = the model before fine-tuning); beside it, when
    given, the test accuracy per corruption type before and after."""
    return _accuracy_plot(epochs, series, xlabel="epoch", ylabel="held-out accuracy", title=title,
                          corruptions=corruptions)
