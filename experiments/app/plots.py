"""Pictures people look at instead of reading: ROC curves, heatmap overlays, histograms, bars."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402


def _save(fig: "plt.Figure", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "Image-level ROC") -> Path:
    """One ROC curve per name from (labels, scores)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (labels, scores) in curves.items():
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, path: Path, title: str,
            vmin: float, vmax: float, threshold: float | None = None) -> Path:
    """image (H, W, 3) in [0, 1], anomaly map (H, W): part | heatmap overlay (+ GT contour). The
    map's title names only the contours actually drawn, so no legend promises a missing mask."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(image)
    axes[0].set_title("part")
    axes[1].imshow(image)
    heat = axes[1].imshow(amap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    legend = []
    if mask is not None and mask.any():
        axes[1].contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)
        legend.append("white: ground truth")
    if threshold is not None and amap.min() < threshold < amap.max():  # contour() warns on an empty level
        axes[1].contour(amap, levels=[threshold], colors="magenta", linewidths=0.8, linestyles="--")
        legend.append("magenta: threshold")
    axes[1].set_title("anomaly map" + (f" ({', '.join(legend)})" if legend else ""))
    for ax in axes:
        ax.axis("off")
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def score_histogram(labels: np.ndarray, scores: np.ndarray, path: Path, threshold: float | None, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(scores.min()), float(scores.max()), 30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defective")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], path: Path, ylabel: str,
                 title: str, errors: Mapping[str, Sequence[float]] | None = None,
                 ylim: tuple[float, float] | None = None) -> Path:
    """Bars per group (e.g. category) for each series (e.g. federated / centralized / local)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        err = None if errors is None else errors.get(name)
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, yerr=err, label=name, capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    crowded = len(groups) > 4
    ax.set_xticks(x, groups, rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set(ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    if crowded:  # long rotated labels below: the legend goes to the right of the axes
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=max(1, len(series)))
    return _save(fig, path)


def heatmap_rgb(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """image (H, W, 3) in [0, 1] and anomaly map (H, W) -> (H, W, 3) uint8 jet overlay, pixel for
    pixel (no axes, no figure), so it lines up with the image. Uses no pyplot state, so request
    threads of the inspection API may call it concurrently."""
    span = max(vmax - vmin, 1e-12)
    heat = matplotlib.colormaps["jet"](np.clip((amap - vmin) / span, 0.0, 1.0))[..., :3]  # (H, W, 3)
    blend = (1.0 - alpha) * np.clip(image, 0.0, 1.0) + alpha * heat
    return np.round(blend * 255.0).astype(np.uint8)


def privacy_curve(rows: Sequence[Mapping], path: Path) -> Path:
    """AUROC (image: solid, pixel: dashed) against ε per category; ε = ∞ drawn at the right end,
    and the clipped centralized model as a dotted line of the category's colour."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    federated = [r for r in rows if r.get("method") == "federated" and r.get("epsilon") is not None]
    finite = sorted({float(r["epsilon"]) for r in federated if np.isfinite(r["epsilon"])})
    inf_x = (finite[-1] * 2.5) if finite else 1.0
    for i, category in enumerate(sorted({r["category"] for r in rows})):
        color = f"C{i}"
        mine = sorted((r for r in federated if r["category"] == category),
                      key=lambda r: float(r["epsilon"]))
        xs = [float(r["epsilon"]) if np.isfinite(r["epsilon"]) else inf_x for r in mine]
        ax.plot(xs, [r["image_auroc"] for r in mine], "o-", color=color, label=f"{category} image")
        ax.plot(xs, [r["pixel_auroc"] for r in mine], "s--", color=color, label=f"{category} pixel")
        central = next((r for r in rows if r["category"] == category and r.get("variant") == "centralized, clipped"),
                       None)
        if central:
            ax.axhline(central["image_auroc"], color=color, ls=":", lw=1)
    ticks = finite + [inf_x]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
    ax.minorticks_off()
    ax.set(xlabel="ε per released vector (δ fixed)", ylabel="AUROC",
           title="privacy vs utility (dotted: centralized, clipped, image AUROC)")
    values = [r[m] for r in federated for m in ("image_auroc", "pixel_auroc") if r.get(m) is not None]
    ax.set_ylim(max(0.0, min(values, default=0.4) - 0.05), 1.02)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def auroc_vs_bytes(rows: Sequence[Mapping], path: Path) -> Path:
    """Image (solid marker) and pixel (hollow) AUROC against bytes uploaded, one point per variant
    and category, labelled with the variant: the communication/accuracy trade-off at a glance."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    points = [r for r in rows if r.get("bytes_sent")]
    for i, category in enumerate(sorted({r["category"] for r in points})):
        mine = [r for r in points if r["category"] == category]
        for ax, metric in zip(axes, ("image_auroc", "pixel_auroc")):
            ax.plot([r["bytes_sent"] / 2**20 for r in mine], [r[metric] for r in mine], "o", color=f"C{i}",
                    label=category)
            for r in mine:
                ax.annotate(r["variant"], (r["bytes_sent"] / 2**20, r[metric]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
            central = next((r for r in rows if r["category"] == category and r.get("method") == "centralized"), None)
            if central:
                ax.axhline(central[metric], color=f"C{i}", ls=":", lw=1)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax, metric in zip(axes, ("image AUROC", "pixel AUROC")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="MiB uploaded (all factories)", ylabel=metric, title=f"{metric} vs bytes (dotted: centralized)")
        ax.legend(fontsize=8)
    return _save(fig, path)
