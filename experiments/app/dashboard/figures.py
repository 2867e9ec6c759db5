"""Matplotlib figures of the dashboard: score histogram, one image's inspection, grouped bars."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

MODEL_COLOURS = {"federated": "tab:blue", "centralized": "tab:orange", "local": "tab:green",
                 "local (mean)": "tab:green"}


def histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None,
              stored: float | None = None) -> plt.Figure:
    """Good vs defective image scores with the decision threshold (and the stored one if moved)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if len(scores):
        low, high = float(scores.min()), float(scores.max())
        for t in (threshold, stored):
            if t is not None:
                low, high = min(low, t), max(high, t)
        bins = np.linspace(low, high if high > low else low + 1, 30)
        ax.hist(scores[labels == 0], bins=bins, alpha=0.65, label="good", color="tab:green")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.65, label="defective", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.1f}")
    if stored is not None and threshold is not None and not np.isclose(stored, threshold):
        ax.axvline(stored, color="grey", ls=":", lw=1.2, label=f"stored {stored:.1f}")
    ax.set(xlabel="image anomaly score", ylabel="images", title="scores of the selection")
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    return fig


def inspection(image: np.ndarray, amap: np.ndarray | None, mask: np.ndarray | None,
               box: tuple[int, int, int, int] | None, vmin: float | None = None,
               vmax: float | None = None) -> plt.Figure:
    """part | heatmap overlay with the most anomalous patch boxed (lime) | ground-truth mask."""
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("part (as the model saw it)", fontsize=10)
    axes[1].imshow(image)
    if amap is not None:
        heat = axes[1].imshow(amap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
        axes[1].set_title("anomaly map", fontsize=10)
    else:
        axes[1].set_title("no patch grid stored for this run", fontsize=10)
    if mask is not None and mask.any():
        axes[1].contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.0)
    if box is not None:
        x0, y0, x1, y1 = box
        axes[1].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=2.5))
    if mask is not None:
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("ground truth" + ("" if mask.any() else " (empty: good part)"), fontsize=10)
    else:
        axes[2].text(0.5, 0.5, "no ground-truth mask", ha="center", va="center", transform=axes[2].transAxes)
        axes[2].set_title("ground truth", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def grouped_bars(frame: pd.DataFrame, group: str, series: str, value: str, title: str,
                 order: Sequence[str] | None = None) -> plt.Figure:
    """One bar per (group, series) of `frame[value]`, zoomed on the range the values span."""
    groups = list(dict.fromkeys(frame[group]))
    names = [s for s in (order or []) if s in set(frame[series])] + \
        [s for s in dict.fromkeys(frame[series]) if s not in (order or [])]
    fig, ax = plt.subplots(figsize=(6, 3.6))  # one size: side-by-side charts share a font scale
    width = 0.8 / max(1, len(names))
    x = np.arange(len(groups))
    values = pd.to_numeric(frame[value], errors="coerce")
    for i, name in enumerate(names):
        ys = [values[(frame[group] == g) & (frame[series] == name)].mean() for g in groups]
        bars = ax.bar(x + i * width - 0.4 + width / 2, ys, width, label=name, color=MODEL_COLOURS.get(name))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    finite = values[np.isfinite(values)]
    low = max(0.0, np.floor((float(finite.min()) - 0.02) * 20) / 20) if len(finite) else 0.0
    ax.set_ylim(low, 1.01 if low < 1 else 1.1)
    ax.set_xticks(x, groups)
    ax.set(ylabel=title, title=title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=max(1, len(names)), frameon=False)
    fig.tight_layout()
    return fig


def upload_bars(frame: pd.DataFrame) -> plt.Figure:
    """MiB each factory uploaded next to the raw patch features it kept at home."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(len(frame))
    mib = 1 / (1 << 20)
    for i, (column, name) in enumerate((("raw_feature_bytes", "raw patch features"), ("bytes_sent", "uploaded"))):
        if column in frame:
            bars = ax.bar(x + (i - 0.5) * 0.4, frame[column].astype(float) * mib, 0.4, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(x, frame["factory"])
    ax.set(ylabel="MiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
