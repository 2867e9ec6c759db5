"""How much of each image the preprocessing keeps, and whether a crop cuts ground truth away.

The paper's resize 256 + center-crop 224 keeps the middle 77% of a square image, 57% of a
300x400 tire and 44% of the height of an 800x1600 part: a defect outside the crop is never
scored and pixel metrics, computed on the crop, never see it. Nothing used to say so.
`crop_coverage` measures it per category (image sizes from the file headers, masks read once);
`warn_lost_area` logs one line per category when the crop keeps less than `MIN_KEPT` of an image
or any mask pixel falls outside it, with what to set instead (`data.crop: null` keeps the whole
image; experiments/studies/preprocessing.md measures the alternatives).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from patchcore.data.images import image_size, union_mask
from patchcore.data.records import ImageRecord
from patchcore.data.transforms import Preprocess

log = logging.getLogger("fedpatch.data")
MIN_KEPT = 0.70  # a square image keeps (224/256)^2 = 77% under the paper's crop: no warning
_SEEN: dict[tuple, "Coverage"] = {}  # one check (and at most one warning) per category and setting


@dataclass(frozen=True)
class Coverage:
    """What a preprocessing keeps of one category's images."""

    category: str
    kept: float  # smallest share of an image's area inside the crop
    size: tuple[int, int]  # (W, H) of that image
    masks: int  # anomalous images with a mask
    masks_cut: int  # ... with some mask pixel outside the crop
    masks_lost: int  # ... with every mask pixel outside the crop

    def problem(self) -> bool:
        return self.kept < MIN_KEPT or self.masks_cut > 0

    def message(self, preprocess: Preprocess) -> str:
        w, h = self.size
        text = (f"{self.category}: resize {_fmt(preprocess.resize)} + center-crop {_fmt(preprocess.crop)} keeps "
                f"{self.kept:.0%} of each {w}x{h} image")
        if self.masks_cut:
            text += (f"; {self.masks_cut} of {self.masks} defect masks reach outside the crop"
                     f" ({self.masks_lost} lie entirely outside): those pixels are never scored")
        elif self.masks:
            text += f" (all {self.masks} defect masks lie inside the crop)"
        return text + ". Set data.crop: null to keep the whole image (experiments/studies/preprocessing.md)"


def _fmt(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def crop_window(preprocess: Preprocess, width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the crop in the original image's pixel coordinates."""
    frame_h, frame_w = preprocess.resized_size(width, height)
    top, left, crop_h, crop_w = preprocess.crop_box(frame_h, frame_w)
    sx, sy = width / frame_w, height / frame_h
    return left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy


def crop_coverage(preprocess: Preprocess, records: Sequence[ImageRecord], category: str) -> Coverage:
    """The share of area kept (worst image size) and the masks the crop cuts, for `records`."""
    kept, worst = 1.0, (0, 0)
    windows: dict[tuple[int, int], tuple[float, float, float, float]] = {}
    sizes = [image_size(record.path) for record in records]  # one header read per image
    for size in sizes:
        if size not in windows:
            windows[size] = crop_window(preprocess, *size)
            x0, y0, x1, y1 = windows[size]
            share = (x1 - x0) * (y1 - y0) / (size[0] * size[1])
            if share < kept or worst == (0, 0):
                kept, worst = min(kept, share), size
    masks = cut = lost = 0
    if preprocess.crop is not None:
        for record, size in zip(records, sizes):
            if not record.mask_paths:
                continue
            mask = np.asarray(union_mask(record.mask_paths, size, image=record.path)) > 0
            ys, xs = np.nonzero(mask)
            if xs.size == 0:
                continue
            masks += 1
            x0, y0, x1, y1 = windows[size]
            inside = (xs + 0.5 >= x0) & (xs + 0.5 < x1) & (ys + 0.5 >= y0) & (ys + 0.5 < y1)
            cut += int(not inside.all())
            lost += int(not inside.any())
    return Coverage(category, kept, worst, masks, cut, lost)


def warn_lost_area(preprocess: Preprocess, records: Sequence[ImageRecord], category: str,
                   key: tuple = ()) -> Coverage | None:
    """Log `Coverage.message` once per (category, preprocessing, key) when the crop loses image
    area or ground truth; returns the coverage (None without a crop: nothing is lost)."""
    if preprocess.crop is None or not records:
        return None
    memo = (category, preprocess.resize, preprocess.crop, *key)
    if memo not in _SEEN:
        _SEEN[memo] = coverage = crop_coverage(preprocess, records, category)
        if coverage.problem():
            log.warning("%s", coverage.message(preprocess))
    return _SEEN[memo]
