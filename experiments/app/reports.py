"""Evaluation outputs: metrics JSON + CSV, per-image scores, ROC, histograms, heatmap overlays."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from experiments.app import plots
from experiments.app.runs import write_json
from patchcore.config import Config
from patchcore.data import ImageDataset
from patchcore.data.sources import model_preprocess
from patchcore.fitting import ScoredSet

METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an `evaluate` dict (AUC-sPRO too, when it was measured)."""
    out = {k: metrics.get(k, float("nan")) for k in METRIC_COLUMNS}
    if "auc_spro_0.05" in metrics:
        out["auc_spro_0.05"] = metrics["auc_spro_0.05"]
    return out


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """A CSV with the union of the rows' keys as columns (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def image_rows(category: str, scored: ScoredSet, threshold: float | None, model: str = "") -> list[dict[str, Any]]:
    rows = []
    for record, score in zip(scored.records, scored.scores):
        # float64: see image_results
        decision = "" if threshold is None else ("reject" if float(score) > threshold else "accept")
        row = {"model": model} if model else {}
        row.update({"category": category, "image": str(record.path), "defect": record.defect,
                    "label": record.label, "score": float(score), "decision": decision})
        rows.append(row)
    return rows


def interesting(scored: ScoredSet, count: int = 8) -> list[tuple[int, str]]:
    """Indices worth looking at: the highest- and lowest-scored defects, the highest-scored good parts."""
    order = np.argsort(-scored.scores)
    bad = [int(i) for i in order if scored.labels[i] == 1]
    good = [int(i) for i in order if scored.labels[i] == 0]
    picks = [(i, "highest-defect") for i in bad[: count // 2]] + [(i, "lowest-defect") for i in bad[::-1][: count // 4]]
    picks += [(i, "highest-good") for i in good[: count - len(picks)]]
    seen, unique = set(), []
    for i, why in picks:
        if i not in seen:
            seen.add(i)
            unique.append((i, why))
    return unique


def write_overlays(folder: Path, category: str, scored: ScoredSet, config: Config,
                   threshold: float | None, count: int = 8) -> list[Path]:
    """Overlays for `interesting` images, with one colour scale for the whole category."""
    dataset = ImageDataset(scored.records, model_preprocess(config.data))
    vmin, vmax = float(np.percentile(scored.maps, 1)), float(scored.maps.max())
    paths = []
    for i, why in interesting(scored, count):
        record = scored.records[i]
        image = dataset[i]["image"].permute(1, 2, 0).clamp(0, 1).numpy()
        title = f"{category}/{record.defect}/{record.path.name}: score {scored.scores[i]:.4g} ({why})"
        if threshold is not None:
            title += f" -> {'reject' if float(scored.scores[i]) > threshold else 'accept'} at {threshold:.4g}"
        name = f"{why}-{record.defect}-{record.path.stem}.png"
        paths.append(plots.overlay(image, scored.maps[i], scored.masks[i] if scored.has_mask[i] else None,
                                   folder / category / name, title, vmin, vmax))
    return paths


def finite_mean(values: Sequence[Any]) -> float | None:
    """Mean of the finite numbers among `values` (None and NaN skipped); None when there are none
    (a metric no category could compute, e.g. pixel AUROC without masks), without numpy's
    empty-slice warning."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def write_evaluation(out: Path, results: Mapping[str, tuple[ScoredSet, dict[str, Any], float | None]],
                     config: Config, overlays: int = 8) -> dict[str, Any]:
    """metrics.json, metrics.csv, scores.csv, roc.png, histograms and overlays for each category."""
    summary, rows, image_table = {}, [], []
    for category, (scored, metrics, threshold) in results.items():
        summary[category] = {**metrics, "threshold": threshold, "num_test_images": len(scored.records)}
        rows.append({"category": category, **flat_metrics(metrics), "threshold": threshold})
        image_table += image_rows(category, scored, threshold)
        plots.score_histogram(scored.labels, scored.scores, out / "histograms" / f"{category}.png", threshold,
                              f"{category}: image scores")
        if overlays:
            write_overlays(out / "overlays", category, scored, config, threshold, overlays)
    if rows:
        means = {k: finite_mean([r[k] for r in rows]) for k in METRIC_COLUMNS}
        rows.append({"category": "mean", **means, "threshold": None})
        summary["mean"] = means
    write_json(out / "metrics.json", summary)
    write_table(out / "metrics.csv", rows)
    write_table(out / "scores.csv", image_table)
    plots.roc_plot({c: (s.labels, s.scores) for c, (s, _, _) in results.items()}, out / "roc.png")
    return summary


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table for the terminal."""
    cells = [[("" if r.get(c) is None else (f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r[c])))
              for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])
