"""Per-image results of a comparison run, kept so they can be inspected without a backbone.

For every model (centralized, federated, each factory's local one) and test image:
`RUN/images.csv` holds one row (who owns the image, its label, score, the model's threshold and
where that threshold came from, accept/reject, and the box of the most anomalous patch in the
model-input pixels), and `RUN/maps/<model>/<category>.npz` holds the patch-score grid (h', w')
under the row's id. The grid is the model's own output before upsampling, so a heatmap is
redrawn exactly (patchcore.anomaly_map.to_pixel_maps) and the box is the grid's argmax cell.
`RUN/factory_metrics.csv` holds each model's metrics on each factory's own test images.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from experiments.app.reports import write_table
from patchcore.evaluation import ScoredSet

MODELS = ("centralized", "federated", "local")
TEST_SET_SOURCE = "f1-max on the test set (optimistic)"
IMAGE_COLUMNS = ("id", "category", "factory", "model", "image", "label", "defect", "mask", "score", "threshold",
                 "threshold_source", "decision", "box_x0", "box_y0", "box_x1", "box_y1")


def _exact(x: float) -> str:
    """A float written with enough digits that decisions re-made from the CSV agree with ours."""
    return repr(float(x))


def patch_box(grid: np.ndarray, input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive, in model-input pixels: the footprint of the grid's argmax
    cell. A (h', w') grid covers an (H, W) input with cells of H/h' x W/w' pixels (the feature
    stride; a patch's receptive field is wider, but this is where its score is placed)."""
    h, w = grid.shape
    i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    height, width = input_hw
    y0, y1 = int(np.floor(i * height / h)), int(np.ceil((i + 1) * height / h))
    x0, x1 = int(np.floor(j * width / w)), int(np.ceil((j + 1) * width / w))
    return x0, y0, min(x1, width), min(y1, height)


def decision_threshold(bank_metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> tuple[float, str]:
    """The model's threshold and its source: the one calibrated on validation images when the bank
    carries it, else the F1-max cut on this test set (which flatters the decisions: say so)."""
    stored = bank_metadata.get("threshold")
    if stored:
        source = (stored.get("details") or {}).get("source", "validation split")
        return float(stored["value"]), f"calibrated on {source} ({stored['method']})"
    return float(metrics["f1_threshold"]), TEST_SET_SOURCE


def subset(scored: ScoredSet, keep: list[int]) -> ScoredSet:
    """The rows `keep` of a scored set, in that order."""
    patches = None if scored.patches is None else scored.patches[keep]
    return ScoredSet([scored.records[i] for i in keep], scored.scores[keep], scored.maps[keep],
                     scored.masks[keep], scored.has_mask[keep], patches)


def by_factory(scored: ScoredSet) -> dict[str, ScoredSet]:
    """A scored set split by the factory that owns each image (the record's domain)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(scored.records):
        groups[record.domain or "unassigned"].append(i)
    return {name: subset(scored, keep) for name, keep in sorted(groups.items())}


class ImageResults:
    """Collects per-image rows and patch grids while a comparison scores its models."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.factory_rows: list[dict[str, Any]] = []
        self.grids: dict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(dict)

    def add(self, model: str, category: str, scored: ScoredSet, threshold: tuple[float, str]) -> None:
        """Rows for every image of `scored`, decided at `threshold` = (value, source)."""
        if scored.patches is None:
            raise ValueError("per-image results need the patch grids: score with patchcore.evaluation.score_records")
        value, source = threshold
        input_hw = tuple(scored.maps.shape[-2:])
        for record, score, grid in zip(scored.records, scored.scores.astype(np.float64), scored.patches):
            # float64: with NumPy 2 a float32 score would round the threshold to float32 too, and
            # a threshold set midway between two adjacent float32 scores would land on one of them
            row_id = len(self.rows)
            x0, y0, x1, y1 = patch_box(grid, input_hw)
            self.rows.append({
                "id": row_id, "category": category, "factory": record.domain or "", "model": model,
                "image": str(record.path.absolute()), "label": int(record.label), "defect": record.defect,
                "mask": ";".join(str(p.absolute()) for p in record.mask_paths), "score": _exact(score),
                "threshold": _exact(value), "threshold_source": source,
                "decision": "reject" if score > value else "accept",
                "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1})
            self.grids[(model, category)][str(row_id)] = grid.astype(np.float32)

    def add_factory_metrics(self, model: str, category: str, factory: str, metrics: Mapping[str, Any]) -> None:
        self.factory_rows.append({"category": category, "factory": factory, "model": model,
                                  **{k: metrics.get(k, float("nan")) for k in ("image_auroc", "pixel_auroc", "aupro")},
                                  "num_images": metrics.get("num_images")})

    def add_per_factory(self, model: str, category: str, scored: ScoredSet,
                        evaluate: Callable[[ScoredSet], Mapping[str, Any]]) -> None:
        """Metrics of a model that saw every factory's test images, on each factory's share."""
        for factory, part in by_factory(scored).items():
            self.add_factory_metrics(model, category, factory, evaluate(part))

    def write(self) -> list[Path]:
        """images.csv, factory_metrics.csv and maps/<model>/<category>.npz."""
        paths = [write_table(self.run_dir / "images.csv", self.rows)]
        if self.factory_rows:
            paths.append(write_table(self.run_dir / "factory_metrics.csv", self.factory_rows))
        for (model, category), grids in self.grids.items():
            path = self.run_dir / "maps" / model / f"{category}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **grids)
            paths.append(path)
        return paths
