"""Evaluation metrics: image/pixel AUROC, AUPRO, AUC-sPRO, F1-max, per-defect breakdown.

Arrays in, plain floats out (numpy arrays or torch tensors are accepted). A metric that is
undefined on the data given (one class only, no anomalous region, no negative pixel) returns
float('nan') instead of raising, so that an all-normal shard still yields a report.

AUPRO and AUC-sPRO are exact: the curve is evaluated at every distinct anomaly score, from one
sort of all pixels. Running counts along that descending order give, at the end of each run of
equal scores (ties enter together), the false positives and every region's hit count at the
threshold t = that score (a pixel is positive when score >= t). The curve starts at (0, 0),
the threshold above the maximum, and ends at FPR 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import precision_recall_curve, roc_auc_score

from patchcore.errors import ConfigError, DataError

NAN = float("nan")
SproRegion = tuple[np.ndarray, float]  # ((H, W) bool mask, saturation area in pixels)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of `x`; torch tensors (also on GPU) are detached and moved to the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int labels in {0, 1} and (N,) float64 finite scores, or DataError."""
    labels, scores = to_numpy(labels).ravel(), to_numpy(scores).astype(np.float64).ravel()
    if labels.shape != scores.shape:
        raise DataError(f"{labels.size} labels but {scores.size} scores: give one of each per image")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise DataError(f"labels must be 0 (normal) or 1 (anomalous), got {np.unique(labels)[:5]}")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or infinity: check the model's output")
    return labels.astype(np.int64), scores


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level ROC AUC (scikit-learn); nan when only one class is present (e.g. all good)."""
    labels, scores = _labels_scores(labels, scores)
    if np.unique(labels).size < 2:
        return NAN
    return float(roc_auc_score(labels, scores))


def rank_auroc(labels: Any, scores: Any) -> np.ndarray:
    """AUROC of `scores` (..., N) against 0/1 `labels` (N,) over the last axis, from ranks
    (Mann-Whitney U, average ranks for ties): equal to roc_auc_score, vectorised over any leading
    axes (bootstrap draws, seeds) without scikit-learn's per-call overhead."""
    labels = np.asarray(labels).astype(bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs both classes, got {n1} anomalous and {n0} good images")
    ranks = rankdata(np.asarray(scores, dtype=np.float64), axis=-1)  # average ranks for ties
    return (ranks[..., labels].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and (N, H, W) finite float maps of the same shape, or DataError."""
    masks, maps = to_numpy(masks), to_numpy(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise DataError(f"masks {masks.shape} and anomaly maps {maps.shape} must both be (N, H, W)")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if not np.isfinite(maps).all():
        raise DataError("anomaly maps contain NaN or infinity: check the model's output")
    return masks.astype(bool), maps


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level ROC AUC over all pixels of all images; nan when one class only."""
    masks, maps = _pixel_inputs(masks, maps)
    if masks.all() or not masks.any():
        return NAN
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def _saturated_gains(ids: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """(Pr,) increase of its region's saturated overlap as each entry turns positive.

    `ids` (Pr,) lists the region of each region entry in descending score order. The k-th entry
    of a region raises min(1, k / s) by (min(k, s) - min(k - 1, s)) / s; which of several tied
    entries counts as k-th does not matter, as ties are only read together.
    """
    counts = np.bincount(ids, minlength=saturation.size)  # (R,)
    by_region = np.argsort(ids, kind="stable")  # stable: keeps the score order in a region
    rank = np.empty(ids.size, dtype=np.float64)  # (Pr,) 1-based rank within its region
    rank[by_region] = np.arange(ids.size) - np.repeat(np.cumsum(counts) - counts, counts) + 1
    s = saturation[ids]  # (Pr,)
    return (np.minimum(rank, s) - np.minimum(rank - 1, s)) / s


def _overlap_curve(neg: np.ndarray, reg: np.ndarray, reg_ids: np.ndarray,
                   saturation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K + 1,) FPR and mean saturated region overlap at every distinct score, from (0, 0).

    neg: (Pn,) scores of negative pixels; reg: (Pr,) scores of region pixels, one entry per
    (pixel, region) pair so regions may overlap; reg_ids: (Pr,) region index in [0, R);
    saturation: (R,) hit count at which a region's overlap reaches 1 (its area for plain PRO).
    """
    scores = np.concatenate([neg, reg])  # (P,)
    order = np.argsort(scores)[::-1]  # (P,) descending
    is_reg = order >= neg.size  # (P,)
    gains = _saturated_gains(reg_ids[order[is_reg] - neg.size], saturation)  # (Pr,)
    ranked = scores[order]  # (P,)
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # (K,) last of each tie run
    hits = np.cumsum(is_reg)[ends]  # (K,) region entries with score >= t
    overlap = np.concatenate([[0.0], np.cumsum(gains)])[hits] / saturation.size  # (K,)
    np.minimum(overlap, 1.0, out=overlap)  # rounding of the running sum must not pass 1
    fpr = (ends + 1 - hits) / neg.size  # (K,)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], overlap])


def _check_fpr_limit(fpr_limit: float) -> float:
    if not (isinstance(fpr_limit, (int, float)) and 0.0 < float(fpr_limit) <= 1.0):
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return float(fpr_limit)


def _normalized_area(fpr: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(fpr) on [0, limit] divided by limit; y is interpolated linearly
    at exactly `limit` when no point lies there. fpr: (K,) non-decreasing from 0 to 1."""
    k = int(np.searchsorted(fpr, limit, side="right"))  # points [0, k) have fpr <= limit
    x, v = fpr[:k], y[:k]
    area = float(np.sum((x[1:] - x[:-1]) * (v[1:] + v[:-1]) / 2.0))
    if x[-1] < limit:  # then k < len(fpr), since fpr[-1] == 1 >= limit
        at_limit = v[-1] + (y[k] - v[-1]) * (limit - x[-1]) / (fpr[k] - x[-1])
        area += (limit - x[-1]) * (v[-1] + at_limit) / 2.0
    return area / limit


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalized area under the PRO curve up to `fpr_limit` (MVTec AD, Bergmann et al. 2021).

    masks: (N, H, W) ground truth, maps: (N, H, W) anomaly scores. Regions are the
    8-connected components of each image's mask; PRO(t) is the mean over all regions of all
    images of |region ∩ {map >= t}| / |region|, and FPR(t) the fraction of all ground-truth
    negative pixels of all images (normal pixels of anomalous images included) with map >= t.
    The area on [0, fpr_limit] (trapezoids, the curve interpolated at fpr_limit) is divided by
    fpr_limit, so a perfect detector scores 1. nan without regions or without negative pixels.
    """
    limit = _check_fpr_limit(fpr_limit)
    masks, maps = _pixel_inputs(masks, maps)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within an image, never across images
    labels, num_regions = ndimage.label(masks, structure=structure)  # (N, H, W)
    neg = maps[~masks]  # (Pn,)
    if num_regions == 0 or neg.size == 0:
        return NAN
    reg_ids = labels[masks].astype(np.int64) - 1  # (Pr,)
    sizes = np.bincount(reg_ids, minlength=num_regions).astype(np.float64)  # (R,)
    fpr, pro = _overlap_curve(neg, maps[masks], reg_ids, sizes)
    return _normalized_area(fpr, pro, limit)


def saturation_area(area: int, saturation_threshold: float, relative_saturation: bool) -> float:
    """Hit count at which a region's sPRO saturates, as the MVTec LOCO evaluation computes it.

    Relative: floor(threshold × area) (kept >= 1 so a tiny region cannot divide by zero);
    absolute: min(threshold, area), so a region smaller than the threshold can still reach 1.
    """
    if area < 1:
        raise DataError("a ground-truth region has no pixel: drop empty region masks")
    if relative_saturation:
        return float(max(1, int(saturation_threshold * area)))
    return float(min(saturation_threshold, area))


def spro_region(mask: Any, spec: Any) -> SproRegion:
    """One AUC-sPRO region: ((H, W) bool mask, saturation area) from a defects_config entry.

    `spec` is a defects_config.json entry (a mapping with `saturation_threshold` and
    `relative_saturation`) or an object with those attributes, e.g. data.autovi.DefectSpec.
    """
    get = spec.get if isinstance(spec, Mapping) else lambda key: getattr(spec, key, None)
    threshold, relative = get("saturation_threshold"), get("relative_saturation")
    if threshold is None or relative is None:
        raise DataError("a defect spec needs saturation_threshold and relative_saturation")
    mask = to_numpy(mask).astype(bool)
    return mask, saturation_area(int(mask.sum()), float(threshold), bool(relative))


def _spro_entries(regions: Sequence[Sequence[SproRegion]], maps: Any, fpr_images: str):
    """Flatten regions and maps into (neg, reg, reg_ids, saturation) for `_overlap_curve`."""
    if len(regions) != len(maps):
        raise DataError(f"{len(regions)} region lists but {len(maps)} anomaly maps: one each")
    neg, reg, ids, sats = [], [], [], []
    for i, (image_regions, amap) in enumerate(zip(regions, maps)):
        amap = to_numpy(amap)  # (H, W)
        if not np.issubdtype(amap.dtype, np.floating):
            amap = amap.astype(np.float64)
        if amap.ndim != 2 or not np.isfinite(amap).all():
            raise DataError(f"anomaly map {i} must be a finite (H, W) array, got {amap.shape}")
        union = np.zeros(amap.shape, dtype=bool)
        for mask, sat in image_regions:
            mask = to_numpy(mask).astype(bool)
            if mask.shape != amap.shape or not mask.any():
                raise DataError(f"a region of image {i} is empty or not {amap.shape}: {mask.shape}")
            if not (np.isfinite(sat) and sat > 0):
                raise DataError(f"a region of image {i} has saturation area {sat}; need > 0")
            reg.append(amap[mask])
            ids.append(np.full(reg[-1].size, len(sats), dtype=np.int64))
            sats.append(float(sat))
            union |= mask
        if fpr_images == "all" or not image_regions:
            neg.append(amap[~union])
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return (cat(neg, np.float64), cat(reg, np.float64), cat(ids, np.int64),
            np.asarray(sats, dtype=np.float64))


def auc_spro(regions: Sequence[Sequence[SproRegion]], maps: Any, fpr_limit: float = 0.05,
             fpr_images: str = "all") -> float:
    """Normalized area under the sPRO curve up to `fpr_limit` (MVTec LOCO AD, AutoVI).

    regions: one list per image of (mask (H, W) bool, saturation area) pairs, one pair per
    ground-truth region file (a region may hold several blobs; regions may overlap); a good
    image has an empty list. Build pairs with `spro_region(mask, defects_config_entry)`.
    maps: (N, H, W) array or N (H, W) arrays. sPRO(region, t) = min(1, |region ∩ {map >= t}| / s)
    and the curve averages it over all regions. FPR(t) is taken, like the official LOCO/AutoVI
    evaluation (metrics.get_fp_tn_areas_per_image), over the pixels outside every region of all
    images (`fpr_images="all"`); `"good"` restricts it to images without regions. Images of
    anomalous samples without annotation must be left out by the caller. nan without regions
    or negative pixels.
    """
    limit = _check_fpr_limit(fpr_limit)
    if fpr_images not in ("all", "good"):
        raise ConfigError(f"fpr_images must be 'all' or 'good', got {fpr_images!r}")
    neg, reg, reg_ids, saturation = _spro_entries(regions, maps, fpr_images)
    if saturation.size == 0 or neg.size == 0:
        return NAN
    fpr, spro = _overlap_curve(neg, reg, reg_ids, saturation)
    return _normalized_area(fpr, spro, limit)


def _cut_below(t: float, scores: np.ndarray) -> float:
    """A value v with (score > v) == (score >= t) on `scores`: midway to the next lower score."""
    lower = scores[scores < t]
    if lower.size == 0:
        return float(np.nextafter(t, -np.inf))
    prev = float(lower.max())
    mid = prev + (t - prev) / 2.0
    return mid if prev <= mid < t else prev


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best image-level F1 over all thresholds and a threshold achieving it.

    The threshold follows the project's decision rule, reject when score > threshold: it lies
    midway between the lowest score flagged at the best cut and the highest one not flagged
    (the lowest such cut when several tie). (nan, nan) without anomalous images.
    """
    labels, scores = _labels_scores(labels, scores)
    if not labels.any():
        return NAN, NAN
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    p, r = precision[: thresholds.size], recall[: thresholds.size]  # (T,) flagged: score >= t
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), _cut_below(float(thresholds[best]), scores)


def f1_flag_all(labels: Any) -> float:
    """F1 of the trivial rule that rejects every image: 2p / (1 + p), p the anomalous share."""
    labels = to_numpy(labels).ravel()
    p = float(labels.mean()) if labels.size else 0.0
    return 2 * p / (1 + p) if p > 0 else NAN


def per_defect_breakdown(labels: Any, scores: Any, defects: Sequence[str]) -> dict[str, dict]:
    """{defect: {image_auroc, num_anomalous, num_good}}: each defect type's anomalous images
    against all good images, to see which defects a bank misses."""
    labels, scores = _labels_scores(labels, scores)
    defects = np.asarray([str(d) for d in defects])
    if defects.size != labels.size:
        raise DataError(f"{defects.size} defect names but {labels.size} images: one per image")
    good = labels == 0
    out: dict[str, dict] = {}
    for name in sorted(set(defects[~good].tolist())):
        chosen = (defects == name) & ~good
        keep = good | chosen
        out[name] = {"image_auroc": image_auroc(labels[keep], scores[keep]),
                     "num_anomalous": int(chosen.sum()), "num_good": int(good.sum())}
    return out


def _pixel_metrics(labels: np.ndarray, masks: Any, maps: Any, has_mask: Any) -> dict[str, Any]:
    """Pixel AUROC and AUPRO over good images and anomalous images that have a mask."""
    masks, maps = _pixel_inputs(masks, maps)
    if masks.shape[0] != labels.size:
        raise DataError(f"{masks.shape[0]} masks for {labels.size} images: one per image")
    keep = np.ones(labels.size, dtype=bool)
    if has_mask is not None:
        has_mask = to_numpy(has_mask).astype(bool).ravel()
        if has_mask.size != labels.size:
            raise DataError(f"{has_mask.size} has_mask flags for {labels.size} images")
        keep = (labels == 0) | has_mask
    masks, maps = masks[keep], maps[keep]
    return {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps),
            "num_pixel_images": int(keep.sum())}


def evaluate(labels: Any, scores: Any, masks: Any = None, maps: Any = None,
             defects: Sequence[str] | None = None, has_mask: Any = None) -> dict[str, Any]:
    """All metrics of one test set as a JSON-ready dict of plain numbers (nan when undefined).

    labels, scores: (N,); masks, maps: (N, H, W) or both None; defects: N names; has_mask: (N,)
    bool, False for anomalous images without ground truth, which pixel metrics then skip.
    """
    labels, scores = _labels_scores(labels, scores)
    f1, threshold = f1_max(labels, scores)
    out: dict[str, Any] = {
        "num_images": int(labels.size), "num_anomalous": int(labels.sum()),
        "image_auroc": image_auroc(labels, scores), "f1_max": f1, "f1_threshold": threshold,
        # F1 of flagging every image (precision = the anomalous share, recall 1): F1-max near it
        # means the scores barely separate the classes, however high it looks
        "f1_flag_all": f1_flag_all(labels),
        "pixel_auroc": NAN, "aupro": NAN, "num_pixel_images": 0,
    }
    if (masks is None) != (maps is None):
        raise DataError("pixel metrics need both masks and anomaly maps, or neither")
    if masks is not None:
        out.update(_pixel_metrics(labels, masks, maps, has_mask))
    if defects is not None:
        out["per_defect"] = per_defect_breakdown(labels, scores, defects)
    return out
