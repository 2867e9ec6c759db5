"""Metrics: hand-computed cases, scikit-learn, and slow threshold-by-threshold references for
AUPRO and AUC-sPRO written here from the definitions, compared over many random sets."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore.data.autovi import DefectSpec
from patchcore.errors import ConfigError, DataError
from patchcore.metrics import (
    auc_spro,
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    per_defect_breakdown,
    pixel_auroc,
    saturation_area,
    spro_region,
)

# ---------------------------------------------------------------- slow, obviously-correct references


def _ref_area(curve: list[tuple[float, float]], limit: float) -> float:
    """Trapezoids over the (fpr, y) points in order, the last segment cut at `limit`."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _ref_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Every distinct score as threshold; regions = 8-connected components of each image."""
    masks = masks.astype(bool)
    regions = []  # (N, H, W) bool each
    for i in range(len(masks)):
        labels, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            region = np.zeros(masks.shape, bool)
            region[i] = labels == k
            regions.append(region)
    negatives = ~masks
    if not regions or not negatives.any():
        return math.nan
    curve = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        positive = maps >= t
        pro = np.mean([(positive & r).sum() / r.sum() for r in regions])
        fpr = (positive & negatives).sum() / negatives.sum()
        curve.append((fpr, pro))
    return _ref_area(curve, limit)


def _ref_auc_spro(regions, maps: np.ndarray, limit: float, fpr_images: str = "all") -> float:
    """Every distinct score as threshold; sPRO = min(1, hits / s); FPR outside all regions."""
    full_regions, negatives = [], np.zeros(maps.shape, bool)
    for i, image_regions in enumerate(regions):
        union = np.zeros(maps.shape[1:], bool)
        for mask, s in image_regions:
            r = np.zeros(maps.shape, bool)
            r[i] = mask
            full_regions.append((r, s))
            union |= mask
        if fpr_images == "all" or not image_regions:
            negatives[i] = ~union
    if not full_regions or not negatives.any():
        return math.nan
    curve = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        positive = maps >= t
        spro = np.mean([min(1.0, (positive & r).sum() / s) for r, s in full_regions])
        curve.append(((positive & negatives).sum() / negatives.sum(), spro))
    return _ref_area(curve, limit)


# ---------------------------------------------------------------- random data


def _blobs(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    """A few dilated random seeds: blobs of varied size, some touching the border."""
    seeds = rng.random(shape) < density
    return ndimage.binary_dilation(seeds, iterations=int(rng.integers(0, 3)))


def _pixel_set(seed: int, n: int = 5, shape=(10, 12), quantize: bool = False):
    rng = np.random.default_rng(seed)
    masks = np.stack([_blobs(rng, shape, 0.04) if rng.random() < 0.7 else np.zeros(shape, bool)
                      for _ in range(n)])
    maps = rng.random(masks.shape) + masks * rng.uniform(0, 1.0)
    return masks, (np.round(maps, 1) if quantize else maps)


# ---------------------------------------------------------------- image level


def test_image_auroc_hand_case_and_sklearn():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 50), np.round(rng.random(50), 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert image_auroc(torch.tensor(labels), torch.tensor(scores)) == image_auroc(labels, scores)


def test_image_auroc_one_class_is_nan_and_bad_input_raises():
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.raises(DataError, match="labels"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="2 labels but 3 scores"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_f1_max_hand_case_threshold_follows_fail_above_rule():
    # cuts: >=0.8 F1 2/3; >=0.4 F1 1/2; >=0.35 F1 0.8; >=0.1 F1 2/3 -> midway 0.35..0.1
    f1, threshold = f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.225)
    assert all(math.isnan(v) for v in f1_max([0, 0], [0.1, 0.2]))


def _f1(labels: np.ndarray, flagged: np.ndarray) -> float:
    tp = np.sum(flagged & (labels == 1))
    return 2 * tp / (flagged.sum() + labels.sum()) if tp else 0.0


@pytest.mark.parametrize("seed", range(8))
def test_f1_max_equals_brute_force_over_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[0] = 1
    scores = np.round(rng.random(40) + 0.3 * labels, 1 + seed % 2)  # ties on even seeds
    cuts = np.concatenate([np.unique(scores) - 1e-9, [scores.max() + 1]])
    best = max(_f1(labels, scores > c) for c in cuts)
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(best, rel=1e-12)
    assert _f1(labels, scores > threshold) == pytest.approx(best, rel=1e-12)


def test_per_defect_breakdown_hand_values():
    labels, scores = [0, 0, 1, 1, 1], [0.1, 0.3, 0.2, 0.9, 0.8]
    out = per_defect_breakdown(labels, scores, ["good", "good", "scratch", "crack", "crack"])
    assert out == {"crack": {"image_auroc": 1.0, "num_anomalous": 2, "num_good": 2},
                   "scratch": {"image_auroc": 0.5, "num_anomalous": 1, "num_good": 2}}
    with pytest.raises(DataError, match="one per image"):
        per_defect_breakdown(labels, scores, ["good"])


# ---------------------------------------------------------------- pixel AUROC and AUPRO


def test_pixel_auroc_matches_sklearn_and_nan_without_anomalous_pixels():
    masks, maps = _pixel_set(1)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert math.isnan(pixel_auroc(np.zeros_like(masks), maps))
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        pixel_auroc(masks, maps[:, :-1])


def test_aupro_hand_case_one_row():
    # negatives 0.1, 0.3; region 0.2, 0.4: curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    masks, maps = np.array([[[0, 0, 1, 1]]]), np.array([[[0.1, 0.3, 0.2, 0.4]]])
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5)  # interpolated at 0.3


def test_aupro_uses_8_connectivity():
    # diagonal neighbours make one region of 3 (4-connectivity would give regions of 1 and 2)
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.1)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2], maps[0, 2, 2] = 0.9, 0.5, 0.5, 0.7
    # (0, 1/3) -> (1/6, 1/3) -> (1/6, 1) -> (1, 1)
    assert aupro(masks, maps) == pytest.approx((1 / 18 + (0.3 - 1 / 6)) / 0.3)


@pytest.mark.parametrize("seed", range(24))
def test_aupro_equals_slow_reference(seed):
    masks, maps = _pixel_set(seed, quantize=seed % 3 == 0)
    limit = (0.3, 0.05, 1.0)[seed % 3]
    expected = _ref_aupro(masks, maps, limit)
    if math.isnan(expected):
        assert math.isnan(aupro(masks, maps, limit))
    else:
        assert aupro(masks, maps, limit) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_aupro_single_region_touching_border_with_ties():
    rng = np.random.default_rng(5)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :3, 5:] = True  # corner region
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)
    assert aupro(masks, maps) == pytest.approx(_ref_aupro(masks, maps, 0.3), rel=1e-9)


def test_aupro_perfect_detector_is_one_and_degenerate_sets_are_nan():
    masks, _ = _pixel_set(2)
    assert masks.any()
    detector = masks * (1.0 + np.random.default_rng(0).random(masks.shape))  # 0 outside, >= 1 in
    assert aupro(masks, detector) == pytest.approx(1.0)
    assert math.isnan(aupro(np.zeros((3, 4, 4)), np.random.rand(3, 4, 4)))  # all normal
    assert math.isnan(aupro(np.ones((1, 4, 4)), np.random.rand(1, 4, 4)))  # no negatives
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(masks, masks.astype(float), fpr_limit=0.0)


def test_aupro_regions_do_not_connect_across_images():
    # same pixel set in both images: 2 regions of 1, not one region of 2
    masks = np.zeros((2, 3, 3), bool)
    masks[:, 1, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 1, 1], maps[1, 1, 1], maps[0, 0, 0] = 0.9, 0.5, 0.7
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(_ref_aupro(masks, maps, 1.0))


# ---------------------------------------------------------------- AUC-sPRO


def test_saturation_area_follows_loco_rules():
    assert saturation_area(5, 0.5, True) == 2.0  # floor(2.5)
    assert saturation_area(4, 10, False) == 4.0  # capped at the region's area
    assert saturation_area(10, 3, False) == 3.0
    assert saturation_area(1, 0.2, True) == 1.0  # never 0
    mask = np.zeros((4, 4), bool)
    mask[:2, :3] = True
    entry = {"defect_name": "cable", "pixel_value": 255, "saturation_threshold": 0.5,
             "relative_saturation": True}
    assert spro_region(mask, entry)[1] == 3.0
    assert spro_region(mask, DefectSpec("cable", 255, 4, False))[1] == 4.0
    with pytest.raises(DataError, match="no pixel"):
        spro_region(np.zeros((4, 4)), entry)
    with pytest.raises(DataError, match="saturation_threshold"):
        spro_region(mask, {"defect_name": "cable"})


def test_auc_spro_hand_case_and_fpr_image_choice():
    # image 0: region (pixels 0-3, s = 2) and negatives 0.85, 0.1; image 1 good: 0.5, 0.05
    maps = [np.array([[0.9, 0.8, 0.3, 0.2, 0.85, 0.1]]), np.array([[0.5, 0.05]])]
    mask = np.array([[1, 1, 1, 1, 0, 0]], bool)
    regions = [[(mask, 2.0)], []]
    # all negatives: (0, .5) (.25, .5) (.25, 1) ... -> (.125 + .25) / .5
    assert auc_spro(regions, maps, fpr_limit=0.5) == pytest.approx(0.75)
    # good images only: the region saturates before any false positive
    assert auc_spro(regions, maps, fpr_limit=0.5, fpr_images="good") == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="fpr_images"):
        auc_spro(regions, maps, fpr_images="normal")


def _spro_set(seed: int, n: int = 5, shape=(9, 11)):
    rng = np.random.default_rng(seed)
    regions, maps = [], rng.random((n, *shape))
    for i in range(n):
        image_regions = []
        for _ in range(int(rng.integers(0, 4)) if i else 0):  # image 0 always good
            mask = _blobs(rng, shape, 0.05)
            if not mask.any():
                continue
            relative = bool(rng.random() < 0.5)
            threshold = rng.uniform(0.05, 1.0) if relative else int(rng.integers(1, 25))
            image_regions.append(spro_region(mask, {"saturation_threshold": threshold,
                                                    "relative_saturation": relative}))
            maps[i] += mask * rng.uniform(0, 0.8)
        regions.append(image_regions)
    return regions, (np.round(maps, 1) if seed % 2 else maps)


@pytest.mark.parametrize("seed", range(20))
def test_auc_spro_equals_slow_reference(seed):
    regions, maps = _spro_set(seed)
    fpr_images = "good" if seed % 4 == 3 else "all"
    limit = (0.05, 0.3, 1.0)[seed % 3]
    expected = _ref_auc_spro(regions, maps, limit, fpr_images)
    got = auc_spro(regions, maps, limit, fpr_images)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_auc_spro_region_larger_than_saturation_touching_border_with_ties():
    rng = np.random.default_rng(11)
    maps = np.round(rng.random((3, 8, 8)), 1)
    big = np.zeros((8, 8), bool)
    big[:, :4] = True  # 32 pixels on the border, saturates after 5 hits
    small = np.zeros((8, 8), bool)
    small[6:, 6:] = True  # overlaps nothing, relative saturation
    regions = [[], [(big, 5.0), spro_region(small, DefectSpec("x", 1, 0.5, True))], [(big, 40.0)]]
    for limit in (0.05, 0.3):
        assert auc_spro(regions, maps, limit) == pytest.approx(_ref_auc_spro(regions, maps, limit),
                                                               rel=1e-9)


def test_auc_spro_perfect_detector_and_nan_cases():
    regions, maps = _spro_set(4)
    perfect = np.zeros_like(maps)
    for i, image_regions in enumerate(regions):
        for mask, _ in image_regions:
            perfect[i][mask] = 1.0
    assert auc_spro(regions, perfect) == pytest.approx(1.0)
    assert math.isnan(auc_spro([[], []], maps[:2]))  # all good
    full = np.ones((4, 4), bool)
    assert math.isnan(auc_spro([[(full, 3.0)]], np.random.rand(1, 4, 4)))  # no negatives
    with pytest.raises(DataError, match="one each"):
        auc_spro([[]], maps)


# ---------------------------------------------------------------- evaluate


def test_evaluate_bundles_metrics_and_skips_anomalous_images_without_masks():
    masks, maps = _pixel_set(7, n=6)
    labels = masks.reshape(6, -1).any(1).astype(int)
    labels[-1], masks[-1], maps[-1] = 1, False, 5.0  # an anomalous image without a mask
    scores = maps.reshape(6, -1).max(1)
    has_mask = np.ones(6, bool)
    has_mask[-1] = False
    out = evaluate(labels, scores, masks, maps, ["good" if label == 0 else "dent" for label in labels], has_mask)
    assert out["aupro"] == pytest.approx(aupro(masks[:-1], maps[:-1]))
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks[:-1], maps[:-1]))
    assert out["num_pixel_images"] == 5
    assert out["image_auroc"] == image_auroc(labels, scores)
    assert (out["f1_max"], out["f1_threshold"]) == f1_max(labels, scores)
    assert out["per_defect"]["dent"]["num_anomalous"] == int(labels.sum())
    assert json.loads(json.dumps(out)).keys() == out.keys()
    with_missing = evaluate(labels, scores, masks, maps)  # the unmasked image counts as negatives
    assert with_missing["aupro"] != pytest.approx(out["aupro"])


def test_evaluate_without_pixels_and_with_half_the_inputs():
    out = evaluate([0, 1], [0.2, 0.7])
    assert out["image_auroc"] == 1.0 and math.isnan(out["aupro"]) and "per_defect" not in out
    with pytest.raises(DataError, match="both masks and anomaly maps"):
        evaluate([0, 1], [0.2, 0.7], masks=np.zeros((2, 3, 3)))
