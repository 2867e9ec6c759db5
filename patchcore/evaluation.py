"""Scoring a list of records in one pass, and its metrics: shared by the command line, the
comparison runs and the federation's clients (which report metrics on their own test images).

`score_records` keeps image scores, pixel maps and ground-truth masks side by side;
`evaluate_scored` computes the metrics at the crop or, with data.evaluate_at_original, at each
image's original size (AutoVI's evaluation, with AUC-sPRO@0.05 from defects_config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from patchcore.config import Config
from patchcore.data import ImageDataset, ImageRecord, PairTransform, image_size, make_loader, read_region, union_mask
from patchcore.data.autovi import DEFECTS_CONFIG, load_defects_config
from patchcore.data.sources import model_preprocess
from patchcore.errors import DataError
from patchcore.metrics import auc_spro, evaluate, spro_region
from patchcore.model import PatchCore
from patchcore.progress import track

NO_MASKS = "no ground-truth masks for the anomalous test images (image-level labels only)"


@dataclass
class ScoredSet:
    """Scores of a list of records, in record order."""

    records: list[ImageRecord]
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, h, w) float32
    masks: np.ndarray  # (N, h, w) bool
    has_mask: np.ndarray  # (N,) bool
    patches: np.ndarray | None = None  # (N, h', w') float32 patch-score grids, before upsampling
    labels: np.ndarray = field(init=False)  # (N,)

    def __post_init__(self) -> None:
        self.labels = np.array([r.label for r in self.records], dtype=np.int64)

    def metrics(self) -> dict[str, Any]:
        """Image metrics always; pixel metrics when some anomalous image has a mask, otherwise
        they are null and `skipped` says why (no numbers invented from empty masks)."""
        defects = [r.defect for r in self.records]
        if not self.pixel_ground_truth:
            out = evaluate(self.labels, self.scores, defects=defects)
            out.update({"pixel_auroc": None, "aupro": None})
            out["skipped"] = {k: NO_MASKS for k in ("pixel_auroc", "aupro")}
            return out
        return evaluate(self.labels, self.scores, masks=self.masks, maps=self.maps,
                        defects=defects, has_mask=self.has_mask)

    @property
    def pixel_ground_truth(self) -> bool:
        """True when some anomalous image has a ground-truth mask (pixel metrics are defined)."""
        return bool((self.has_mask & (self.labels == 1)).any())


def evaluate_scored(scored: ScoredSet, config: Config, root: Path, category: str) -> dict[str, Any]:
    """The metrics of a scored set, at the crop or (data.evaluate_at_original) at full size."""
    if not config.data.evaluate_at_original or not scored.pixel_ground_truth:
        return scored.metrics()
    preprocess = model_preprocess(config.data)
    specs, skipped = None, {}
    if config.data.format == "autovi":
        if (Path(root) / category / DEFECTS_CONFIG).is_file():
            specs = load_defects_config(root, category)
        else:
            skipped["auc_spro_0.05"] = (f"{Path(root) / category / DEFECTS_CONFIG} not found "
                                        "(sPRO needs its saturation thresholds)")
    maps, masks, regions = [], [], []
    for record, amap in zip(scored.records, scored.maps):
        width, height = image_size(record.path)
        maps.append(preprocess.invert_to_original(torch.from_numpy(amap), (height, width)).numpy())
        masks.append(np.asarray(union_mask(record.mask_paths, (width, height), image=record.path)) > 0
                     if record.mask_paths else np.zeros((height, width), bool))
        if specs is not None:
            regions.append([spro_region(*read_region(p, specs, (width, height))) for p in record.mask_paths])
    if len({m.shape for m in maps}) > 1:
        raise DataError(f"images of category {category} differ in size; evaluate_at_original needs one size")
    full = ScoredSet(scored.records, scored.scores, np.stack(maps), np.stack(masks), scored.has_mask)
    metrics = full.metrics()
    if specs is not None:
        keep = [i for i, r in enumerate(scored.records) if r.label == 0 or r.mask_paths]
        metrics["auc_spro_0.05"] = auc_spro([regions[i] for i in keep], [maps[i] for i in keep], fpr_limit=0.05)
    if skipped:
        metrics["auc_spro_0.05"] = None
        metrics["skipped"] = skipped
    metrics["resolution"] = "original"
    return metrics


def loader_for(records: Sequence[ImageRecord], config: Config, shifts: Mapping[str, PairTransform] | None = None):
    dataset = ImageDataset(list(records), model_preprocess(config.data), shifts)
    return make_loader(dataset, config.data.batch_size, config.data.num_workers)


def score_records(model: PatchCore, records: Sequence[ImageRecord], config: Config,
                  shifts: Mapping[str, PairTransform] | None = None, progress: bool = True,
                  desc: str = "score") -> ScoredSet:
    """One pass over `records`: image scores, pixel maps, masks and the patch-score grids."""
    scores, maps, masks, has_mask, patches = [], [], [], [], []
    for batch in track(loader_for(records, config, shifts), desc, progress):
        with torch.inference_mode():
            p = model.patch_scores(batch["image"])  # (B, h', w')
            s, m = model.scores_from_patches(p, tuple(batch["image"].shape[-2:]))
        patches.append(p.cpu().numpy().astype(np.float32))
        scores.append(s.cpu().numpy())
        maps.append(m.cpu().numpy().astype(np.float32))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        has_mask.append(batch["has_mask"].numpy())
    return ScoredSet(list(records), np.concatenate(scores), np.concatenate(maps),
                     np.concatenate(masks), np.concatenate(has_mask), np.concatenate(patches))
