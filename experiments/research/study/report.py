"""A study's outputs: report.md (findings first, tables, PNG plots), CSVs and the manifest.

Every study writes the same files, so a reader learns the layout once:
- report.md: what was compared and how, the findings in words (computed from the numbers),
  the summary table (mean ± std over seeds), the paired differences with their 95% CIs, the
  study's own tables, and the plots;
- runs.csv (one row per condition, method, seed and category), summary.csv, differences.csv,
  and any table the study adds; scores.csv.gz (every test image's score under every run, what
  the bootstraps resample); manifest.json (config, seeds, versions, commit, timings).
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments.app.plots import _save, plt
from experiments.app.reports import write_table
from experiments.research.study.core import Study
from patchcore.memory_bank import atomic_write_bytes


@dataclass
class Table:
    """A titled table of the report (also written as NAME.csv)."""

    name: str
    title: str
    rows: list[dict[str, Any]]
    columns: list[str]
    note: str = ""


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
    return str(v)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(c.replace("_", " ") for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def summary_table(study: Study) -> Table:
    rows = []
    for r in study.results.summary():
        row = {k: r[k] for k in ("condition", "method", "category", "seeds")}
        for m in ("image_auroc", "pixel_auroc", "aupro"):
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            row[m] = "–" if not np.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"
        rows.append(row)
    return Table("summary", "Mean ± std over seeds", rows,
                 ["condition", "method", "category", "image_auroc", "pixel_auroc", "aupro", "seeds"])


def difference_table(rows: list[dict[str, Any]]) -> Table:
    shown = [{**r, "a": f"{r['a_mean']:.3f} ± {r['a_std']:.3f}", "b": f"{r['b_mean']:.3f} ± {r['b_std']:.3f}",
              "difference": f"{r['diff']:+.3f} ± {r['diff_std']:.3f}",
              "95% CI": f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"} for r in rows]
    return Table("differences", "Paired differences of image AUROC (a − b)", shown,
                 ["comparison", "category", "a", "b", "difference", "95% CI", "real", "seeds_agree", "seeds", "images"],
                 "a and b: mean ± std over seeds; difference: mean ± std of the per-seed differences; "
                 "95% CI: paired bootstrap over test images (2,000 stratified draws, the same images for "
                 "both methods and every seed); real: the CI excludes 0; seeds agree: every seed's difference has "
                 "the same sign (the CI resamples images, not seeds).")


def forest(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Each paired difference as a dot with its 95% CI; the zero line marks 'no difference'."""
    if not rows:
        return None
    labels = [f"{r['comparison']} · {r['category']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        colour = "tab:red" if r["real"] else "tab:gray"
        ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color=colour, lw=2)
        ax.plot(r["diff"], yi, "o", color=colour)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlabel="image AUROC difference (a − b), 95% CI", title=title)
    return _save(fig, path)


def lines(x: Sequence[float], series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path,
          xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path:
    """One line per series with ± std bands; x may be log-scaled (factories, bank sizes)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (mean, std) in series.items():
        mean, std = np.asarray(mean, float), np.asarray(std, float)
        xs = np.asarray(x[:len(mean)], float)
        ax.plot(xs, mean, "o-", label=name)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def summary_bars(study: Study, path: Path, title: str) -> Path:
    """Image AUROC mean ± std per (condition · method), one bar colour per category."""
    summary = study.results.summary()
    groups = list(dict.fromkeys(f"{r['condition']} · {r['method']}" for r in summary))
    categories = list(dict.fromkeys(r["category"] for r in summary))
    find = {(f"{r['condition']} · {r['method']}", r["category"]): r for r in summary}
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(groups) * max(1, len(categories))), 4.2))
    width = 0.8 / max(1, len(categories))
    for i, c in enumerate(categories):
        means = [find[(g, c)]["image_auroc_mean"] if (g, c) in find else np.nan for g in groups]
        stds = [find[(g, c)]["image_auroc_std"] if (g, c) in find else 0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=2, label=c)
    finite = [r["image_auroc_mean"] for r in summary if np.isfinite(r["image_auroc_mean"])]
    ax.set_ylim(max(0.0, math.floor((min(finite, default=0.5) - 0.05) * 20) / 20), 1.01)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="image AUROC (mean ± std over seeds)", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_scores(path: Path, study: Study) -> Path:
    """Every test image's score under every run (condition, method, seed, category, path, label,
    score): what the paired bootstraps resampled, so a finished study can be re-analysed."""
    import csv
    import gzip
    import io

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["condition", "method", "seed", "category", "path", "label", "score"])
    for r in study.results.runs:
        for p, label, score in zip(r.paths, r.labels, r.scores):
            writer.writerow([r.condition, r.method, r.seed, r.category, p, int(label), repr(float(score))])
    atomic_write_bytes(path, gzip.compress(text.getvalue().encode(), mtime=0))
    return path


def write_report(study: Study, title: str, what: str, findings: list[str], differences: list[dict[str, Any]],
                 tables: Sequence[Table] = (), figures: Sequence[Path | None] = ()) -> Path:
    """Write report.md and the CSVs of `study`; returns the report's path."""
    out = study.out
    write_table(out / "runs.csv", [r.row() for r in study.results.runs])
    write_scores(out / "scores.csv.gz", study)
    write_table(out / "summary.csv", study.results.summary())
    if differences:
        write_table(out / "differences.csv", differences)
    for t in tables:
        write_table(out / f"{t.name}.csv", t.rows)
    figures = [f for f in (summary_bars(study, out / "image_auroc.png", f"{study.name}: image AUROC"),
                           forest(differences, out / "differences.png", f"{study.name}: paired differences"),
                           *figures) if f is not None]
    c = study.config
    command = "fedpatch " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else ""
    lines_ = [f"# {title}\n", "## Findings", *[f"- {f}" for f in findings], "",
              "## Setup", what, "",
              f"Data: {c.data.format} ({', '.join(sorted({r.category for r in study.results.runs}))}), "
              f"backbone {c.model.backbone.name} ({c.model.layer_weighting} weighting), coreset "
              f"{c.model.coreset.ratio:g} ({c.model.coreset.method}), {c.federation.num_factories} factories "
              f"({c.federation.partition}), seeds {study.seeds}."
              + (f"\n\nCommand: `{command}`" if command else ""), ""]
    for t in (summary_table(study), *([difference_table(differences)] if differences else []), *tables):
        lines_ += [f"## {t.title}", markdown(t.rows, t.columns)]
        if t.note:
            lines_.append(t.note + "\n")
    lines_ += ["## Plots", *[f"![{p.stem}]({p.name})\n" for p in figures]]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines_).encode())
    return path


def verdict(d: dict[str, Any], a: str | None = None, b: str | None = None) -> str:
    """One difference row in words: 'a 0.812 vs b 0.803: +0.009 (95% CI ...; within noise)';
    a and b default to the row's own labels ("condition / method")."""
    a, b = a or d["a"], b or d["b"]
    state = "within noise"
    if d["real"]:
        state = "a real gap; " + ("every seed agrees" if d.get("seeds_agree") else "the seeds disagree in sign")
    return (f"{d['category']}: {a} {d['a_mean']:.3f} vs {b} {d['b_mean']:.3f}, difference {d['diff']:+.3f} "
            f"± {d['diff_std']:.3f} over seeds (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}: {state})")
