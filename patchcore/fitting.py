"""Fit one category: the shared step behind `fit` and `compare`.

`fit_category` builds a bank from training records and calibrates a threshold on validation
images when the category has them. Scoring lives in patchcore/evaluation.py (re-exported here).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from patchcore.bank_metadata import bank_metadata, set_threshold
from patchcore.config import Config
from patchcore.data import ImageRecord, PairTransform
from patchcore.evaluation import ScoredSet, evaluate_scored, loader_for, score_records
from patchcore.model import PatchCore
from patchcore.threshold import Threshold, calibrate_threshold

__all__ = ["ScoredSet", "calibrate", "evaluate_scored", "fit_category", "loader_for", "score_records"]


def calibrate(model: PatchCore, validation: Sequence[ImageRecord], config: Config,
              shifts: Mapping[str, PairTransform] | None = None,
              progress: bool = True) -> tuple[Threshold, dict[str, float]] | None:
    """A reject/accept threshold from validation images and the bank's display range, or None
    when there are none. The threshold's details say where its images came from: a validation
    split, or training normals held out of the bank (threshold.holdout)."""
    if not validation:
        return None
    scored = score_records(model, validation, config, shifts, progress, desc="calibrate")
    normal = scored.scores[scored.labels == 0]
    anomalous = scored.scores[scored.labels == 1]
    method = config.threshold.method if len(anomalous) else "quantile"
    threshold = calibrate_threshold(normal, anomalous if len(anomalous) else None, method=method,
                                    quantile=config.threshold.quantile)
    held = sum(r.held_out for r in validation)
    source = ({"source": "held-out training normals", "holdout": config.threshold.holdout, "seed": config.seed}
              if held else {"source": "validation split"})
    threshold = Threshold(threshold.value, threshold.method, {**threshold.details, **source})
    return threshold, display_range(scored.maps[scored.labels == 0], threshold.value)


def display_range(normal_maps: np.ndarray, threshold: float) -> dict[str, float]:
    """One colour scale for every overlay of a bank: vmin = the median pixel of the normal
    calibration maps (a normal surface is cold), vmax = as far above the threshold as vmin is
    below it, so the threshold sits mid-scale and only what exceeds it turns warm to red."""
    vmin = float(np.median(normal_maps)) if normal_maps.size else 0.0
    vmin = min(vmin, threshold)
    return {"vmin": vmin, "vmax": float(threshold + max(threshold - vmin, 1e-12))}


def fit_category(config: Config, category: str, records: Sequence[ImageRecord],
                 shifts: Mapping[str, PairTransform] | None = None, progress: bool = True,
                 model: PatchCore | None = None) -> tuple[PatchCore, torch.Tensor]:
    """A PatchCore fitted on the category's training records (threshold from its validation
    records, when any, in the bank metadata), and the (N, D) training features it saw.

    Pass `model` to reuse a loaded backbone across categories; its bank is replaced."""
    model = model or PatchCore(config.model, device=config.device, seed=config.seed)
    train = [r for r in records if r.split == "train"]
    features = model.extract(loader_for(train, config, shifts), progress, desc=f"extract {category}")
    meta = bank_metadata(model.config, model.seed, model.backbone_id, category=category, num_patches=len(features),
                         num_train_images=len(train), resize=config.data.resize, crop=config.data.crop)
    model.set_bank(model.subsample(features, progress=progress), meta)
    calibrated = calibrate(model, [r for r in records if r.split == "validation"], config, shifts, progress)
    if calibrated is not None:
        set_threshold(model.bank.metadata, *calibrated)
    return model, features
