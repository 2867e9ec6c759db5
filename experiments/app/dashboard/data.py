"""What the dashboard reads from run folders: plain functions, testable without Streamlit.

A run folder is listed when its manifest.json is readable and its results are on disk (a run
still writing, or one that died before its results, is skipped). Two kinds are understood:
`compare` (results.json, images.csv, maps/, factory_metrics.csv: experiments/app/image_results.py)
and `fit` (its newest evaluation-*/: scores.csv and metrics.json; no patch grids, so no heatmaps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from patchcore.anomaly_map import to_pixel_maps

KINDS = ("compare", "fit")
DECISIONS = ("all", "accept", "reject")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
FIT_MODEL = "fit"  # the one model of a `fedpatch fit` run


@dataclass(frozen=True)
class Run:
    """A run folder the dashboard can show."""

    path: Path
    kind: str  # "compare" | "fit"
    status: str  # from manifest.json: "complete", "running", ...
    started: str  # UTC ISO time, "" when unknown

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.kind}, {self.status})"


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def latest_evaluation(run: Path) -> Path | None:
    """The newest evaluation-*/ of a fit run that has its scores.csv, or None."""
    found = [p for p in run.glob("evaluation-*") if (p / "scores.csv").is_file() and (p / "metrics.json").is_file()]
    return max(found, key=lambda p: p.name) if found else None


def has_results(folder: Path, kind: str) -> bool:
    if kind == "compare":
        return (folder / "results.json").is_file() and (folder / "images.csv").is_file()
    return latest_evaluation(folder) is not None


def as_run(folder: Path) -> Run | None:
    """The folder as a Run, or None when it is not a finished-enough compare/fit run."""
    manifest = _manifest(folder)
    if manifest is None or manifest.get("kind") not in KINDS or not has_results(folder, manifest["kind"]):
        return None
    return Run(folder, manifest["kind"], str(manifest.get("status", "unknown")), str(manifest.get("started_utc", "")))


def discover_runs(results_dir: str | Path) -> list[Run]:
    """Runs in `results_dir` (or `results_dir` itself when it is a run), newest first."""
    root = Path(results_dir).expanduser()
    if not root.is_dir():
        return []
    itself = as_run(root)
    if itself is not None:
        return [itself]
    runs = [r for r in (as_run(p) for p in root.iterdir() if p.is_dir()) if r is not None]
    return sorted(runs, key=lambda r: (r.started, r.path.name), reverse=True)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_images(run: Run) -> pd.DataFrame:
    """One row per (model, test image): the images.csv columns, whatever the run's kind."""
    if run.kind == "compare":
        frame = pd.read_csv(run.path / "images.csv", keep_default_na=False,
                            dtype={"factory": str, "mask": str, "defect": str, "threshold_source": str})
        frame["has_grid"] = True
        return frame
    return _fit_images(run)


def _fit_images(run: Run) -> pd.DataFrame:
    """scores.csv of the newest evaluation, in the images.csv shape (thresholds from metrics.json)."""
    folder = latest_evaluation(run.path)
    frame = pd.read_csv(folder / "scores.csv", keep_default_na=False, dtype={"defect": str})
    metrics = read_json(folder / "metrics.json")
    thresholds = {c: m.get("threshold") for c, m in metrics.items() if isinstance(m, dict)}
    frame.insert(0, "id", range(len(frame)))
    frame["factory"], frame["model"], frame["mask"] = "", FIT_MODEL, ""
    frame["threshold"] = [np.nan if thresholds.get(c) is None else float(thresholds[c]) for c in frame["category"]]
    frame["threshold_source"] = [metrics.get(c, {}).get("threshold_source", "stored") for c in frame["category"]]
    frame["decision"] = decide(frame["score"].to_numpy(float), frame["threshold"].to_numpy(float))
    for key in ("box_x0", "box_y0", "box_x1", "box_y1"):
        frame[key] = -1
    frame["has_grid"] = False
    return frame


def decide(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """'reject' where the score is strictly above the threshold, else 'accept' (as Threshold.decide)."""
    return np.where(np.asarray(scores, float) > np.asarray(threshold, float), "reject", "accept")


def select(frame: pd.DataFrame, model: str, category: str, factory: str = "all") -> pd.DataFrame:
    """The rows of one model and category, optionally one factory's images."""
    keep = (frame["model"] == model) & (frame["category"] == category)
    if factory != "all":
        keep &= frame["factory"] == factory
    return frame[keep]


def apply_filters(rows: pd.DataFrame, threshold: float, decision: str = "all",
                  defects: list[str] | None = None) -> pd.DataFrame:
    """Re-decide `rows` at `threshold`, then keep the wanted decision and defect types."""
    rows = rows.assign(decision=decide(rows["score"].to_numpy(float), threshold))
    if decision != "all":
        rows = rows[rows["decision"] == decision]
    if defects is not None:
        rows = rows[rows["defect"].isin(defects)]
    return rows


def stored_thresholds(rows: pd.DataFrame) -> dict[str, float]:
    """{factory: threshold} when the selected rows hold several (local models: one per factory),
    else {"": the one threshold}; {} when none is stored."""
    pairs = rows.groupby("factory")["threshold"].first() if len(rows) else pd.Series(dtype=float)
    found = {str(k): float(v) for k, v in pairs.items() if np.isfinite(v)}
    return found if len(set(found.values())) > 1 else {"": v for v in found.values()}


def default_threshold(rows: pd.DataFrame) -> float | None:
    """The stored threshold of the selection (the median when factories' local models differ)."""
    values = list(stored_thresholds(rows).values())
    return float(np.median(values)) if values else None


def selection_metrics(run: Run, model: str, category: str, factory: str = "all") -> dict[str, Any]:
    """image/pixel AUROC and AUPRO of a selection, with where they come from."""
    if run.kind == "fit":
        metrics = read_json(latest_evaluation(run.path) / "metrics.json").get(category, {})
        return {**{k: metrics.get(k) for k in METRICS}, "source": "evaluation metrics.json"}
    if factory != "all":
        table = factory_metrics(run)
        hit = table[(table["model"] == model) & (table["category"] == category) & (table["factory"] == factory)]
        if len(hit):
            return {**{k: float(hit.iloc[0][k]) for k in METRICS}, "source": f"{factory}'s own test images"}
        return {**{k: None for k in METRICS}, "source": "not measured for this factory"}
    results = read_json(run.path / "results.json")
    if model == "local":
        per = results.get("local", {}).get(category, {})
        values = {k: float(np.nanmean([m.get(k, np.nan) for m in per.values()])) if per else None for k in METRICS}
        return {**values, "source": f"mean of {len(per)} local models, each on its own test images"}
    metrics = results.get(model, {}).get(category) or {}
    return {**{k: metrics.get(k) for k in METRICS}, "source": "all factories' test images (results.json)"}


def factory_metrics(run: Run) -> pd.DataFrame:
    """Rows (category, factory, model, image_auroc, pixel_auroc, aupro): each model on each factory's
    test images. From factory_metrics.csv; older runs: local models + the clients' own reports."""
    path = run.path / "factory_metrics.csv"
    if path.is_file():
        return pd.read_csv(path, dtype={"factory": str})
    results = read_json(run.path / "results.json")
    rows = [{"category": c, "factory": f, "model": "local", **{k: m.get(k) for k in METRICS}}
            for c, per in results.get("local", {}).items() for f, m in per.items()]
    for f, per in results.get("federation", {}).get("per_factory_metrics", {}).items():
        rows += [{"category": c, "factory": f, "model": "federated", **{k: m.get(k) for k in METRICS}}
                 for c, m in per.items()]
    return pd.DataFrame(rows, columns=["category", "factory", "model", *METRICS])


def category_metrics(run: Run) -> pd.DataFrame:
    """Rows (category, model, image_auroc, pixel_auroc, aupro) from results.json's table."""
    rows = read_json(run.path / "results.json").get("rows", [])
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["category", "model", *METRICS])
    frame["model"] = frame["method"].str.replace(r"local \(mean of \d+\)", "local (mean)", regex=True)
    return frame[["category", "model", *[k for k in METRICS if k in frame]]]


def uploads(run: Run) -> pd.DataFrame:
    return pd.DataFrame(read_json(run.path / "results.json").get("uploads", []))


def client_problems(run: Run) -> pd.DataFrame:
    """One row per failed, missing, refused or rejected client, and per factory the poisoning
    screen flagged ("none" rows when a list is empty)."""
    federation = read_json(run.path / "results.json").get("federation", {})
    rows = []
    for kind in ("failed", "missing", "refused", "rejected"):
        entries = federation.get(kind) or []
        if not entries:
            rows.append({"problem": kind, "client": "none", "detail": ""})
        for entry in entries:
            if isinstance(entry, Mapping):
                client = entry.get("factory") or entry.get("name") or f"node {entry.get('node_id', '?')}"
                detail = "; ".join(f"{k}: {v}" for k, v in entry.items() if k not in ("factory", "name"))
            else:
                client, detail = entry, ""
            rows.append({"problem": kind, "client": str(client), "detail": detail})
    flagged = [(category, reason) for category, screen in sorted((federation.get("poisoning") or {}).items())
               for reason in (screen.get("reasons") or {}).values()]
    for category, reason in flagged:
        factory, _, why = reason.partition(": ")
        rows.append({"problem": "poisoning flagged", "client": factory, "detail": f"{category}: {why}"})
    if not flagged:
        rows.append({"problem": "poisoning flagged", "client": "none", "detail": ""})
    return pd.DataFrame(rows)


def load_grid(run: Run, model: str, category: str, row_id: int) -> np.ndarray | None:
    """The (h', w') patch-score grid of row `row_id`, or None when the run kept none."""
    path = run.path / "maps" / model / f"{category}.npz"
    if not path.is_file():
        return None
    with np.load(path) as grids:
        return grids[str(row_id)] if str(row_id) in grids.files else None


def pixel_map(grid: np.ndarray, input_hw: tuple[int, int], sigma: float) -> np.ndarray:
    """The model's own anomaly map from its patch grid: bilinear upsampling + Gaussian σ."""
    with torch.no_grad():
        return to_pixel_maps(torch.from_numpy(np.asarray(grid, np.float32))[None], input_hw, sigma)[0].numpy()


def box_of(row: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the most anomalous patch from an images.csv row, None when absent."""
    box = tuple(int(row[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    return None if min(box) < 0 else box


def load_run_config(run: Run) -> Any:
    """The run's resolved config (config.yaml) as an ExperimentConfig."""
    from federated.config import ExperimentConfig
    from patchcore.config import load_config

    return load_config(run.path / "config.yaml", ExperimentConfig)


@lru_cache(maxsize=4)
def _shifts(num_factories: int, seed: int, strength: float, families: tuple[str, ...],
            shifted: int | None) -> dict[str, Any]:
    from federated.shift import shifts_for_factories

    return shifts_for_factories(num_factories, seed, strength, families, shifted)


def factory_shifts(config: Any) -> dict[str, Any]:
    """{factory: shift} as the run drew them (plan_factories' shifts are a pure function of the
    config; drawing them here avoids listing, or regenerating, the whole dataset)."""
    f = config.federation
    return (_shifts(f.num_factories, config.seed, f.shift_strength, tuple(f.shift_families), f.shifted_factories)
            if f.domain_shift else {})


@dataclass
class ModelView:
    """An image as the model saw it: (H, W, 3) in [0, 1], its (H, W) mask, and what was applied."""

    image: np.ndarray
    mask: np.ndarray | None
    note: str


def model_view(config: Any, row: Mapping[str, Any]) -> ModelView:
    """Read the row's image (and mask), apply its factory's domain shift and the run's resize/crop."""
    from patchcore.data import ImageDataset, ImageRecord
    from patchcore.data.sources import model_preprocess

    masks = tuple(Path(p) for p in str(row.get("mask") or "").split(";") if p)
    factory = str(row.get("factory") or "") or None
    record = ImageRecord(Path(row["image"]), str(row["category"]), int(row["label"]), str(row["defect"]), "test",
                         masks, factory)
    shifts = factory_shifts(config) if factory else {}
    item = ImageDataset([record], model_preprocess(config.data), shifts)[0]
    resize, crop = config.data.resize, config.data.crop
    note = f"resize {resize}, crop {crop}"
    note += f"; {factory}'s camera shift applied" if factory in shifts else "; no domain shift"
    mask = item["mask"][0].numpy() > 0.5 if masks else None
    return ModelView(item["image"].permute(1, 2, 0).clamp(0, 1).numpy(), mask, note)
