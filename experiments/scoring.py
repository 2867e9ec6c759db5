"""Fit one category: the shared step behind `fit` and `compare`.

`fit_category` builds a bank from training records and calibrates a threshold on validation
images when the category has them. Scoring lives in patchcore/evaluation.py (re-exported here).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from patchcore.config import Config
from patchcore.data import ImageRecord, PairTransform
from patchcore.evaluation import ScoredSet, evaluate_scored, loader_for, score_records
from patchcore.model import PatchCore
from patchcore.threshold import Threshold, calibrate_threshold

__all__ = ["ScoredSet", "calibrate", "evaluate_scored", "fit_category", "loader_for", "score_records"]


def calibrate(model: PatchCore, validation: Sequence[ImageRecord], config: Config,
              shifts: Mapping[str, PairTransform] | None = None, progress: bool = True) -> Threshold | None:
    """A PASS/FAIL threshold from validation images, or None when there are none."""
    if not validation:
        return None
    scored = score_records(model, validation, config, shifts, progress, desc="calibrate")
    normal = scored.scores[scored.labels == 0]
    anomalous = scored.scores[scored.labels == 1]
    method = config.threshold.method if len(anomalous) else "quantile"
    return calibrate_threshold(normal, anomalous if len(anomalous) else None, method=method,
                               quantile=config.threshold.quantile)


def fit_category(config: Config, category: str, records: Sequence[ImageRecord],
                 shifts: Mapping[str, PairTransform] | None = None, progress: bool = True,
                 model: PatchCore | None = None) -> tuple[PatchCore, torch.Tensor]:
    """A PatchCore fitted on the category's training records (threshold from its validation
    records, when any, in the bank metadata), and the (N, D) training features it saw.

    Pass `model` to reuse a loaded backbone across categories; its bank is replaced."""
    model = model or PatchCore(config.model, device=config.device, seed=config.seed)
    train = [r for r in records if r.split == "train"]
    features = model.extract(loader_for(train, config, shifts), progress, desc=f"extract {category}")
    meta = {"category": category, "num_train_images": len(train), "preprocess": {
        "resize": config.data.resize, "crop": config.data.crop}}
    model.set_bank(model.subsample(features, progress=progress), meta, num_patches=len(features))
    threshold = calibrate(model, [r for r in records if r.split == "validation"], config, shifts, progress)
    if threshold is not None:
        model.bank.metadata["threshold"] = threshold.to_dict()
    return model, features
