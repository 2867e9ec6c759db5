"""Score single images with a saved bank: `fedpatch predict` here, the inspection API in serve.py.

`BankScorer` is the part both share: a bank loaded once with the model, preprocessing and
threshold it was fitted with, `inspect(image)` giving the score, the pixel map and the patch
grid of one image, `decide(score)` the accept/reject word and `color_scale(result)` the heatmap's
colour range. The two front ends only differ in how they ship the answer, so an operator sees the
same words and the same colours from `fedpatch predict` and from the inspection page.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from experiments.app import plots
from experiments.app.image_results import patch_box
from experiments.app.reports import format_table, write_table
from experiments.app.runs import new_run_dir, write_json
from patchcore.data import ImageDataset, ImageRecord
from patchcore.data.transforms import Preprocess
from patchcore.errors import BankFormatError, DataError
from patchcore.memory_bank import MemoryBank
from patchcore.model import PatchCore


@dataclass(frozen=True)
class Inspection:
    """One scored image, on the CPU."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]: the model's input
    score: float  # image score = max patch score
    amap: np.ndarray  # (H, W) float32 pixel anomaly map
    patches: np.ndarray  # (h, w) float32 patch-score grid

    def max_patch_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive, in input pixels: the grid cell with the highest patch
        score, i.e. the patch whose distance became the image score (image_results.patch_box)."""
        return patch_box(self.patches, tuple(self.amap.shape))


THRESHOLD_SPAN = 2.0  # without a stored display range the colours run from 0 to 2 x threshold


@dataclass(frozen=True)
class ColorScale:
    """The heatmap's colour range and where it came from. One scale per bank, so the same colour
    means the same anomaly score on every part; "image" (each map stretched to its own range) is
    the last resort for a bank with neither a display range nor a threshold, and says so."""

    vmin: float
    vmax: float
    source: Literal["bank", "threshold", "image"]


def stored_color_scale(metadata: Mapping[str, Any], where: str) -> ColorScale | None:
    """The bank's `display_range` {"vmin", "vmax"} (set at calibration from normal pixel maps), or
    None when absent; BankFormatError when present but unusable, rather than a silently odd picture."""
    stored = metadata.get("display_range")
    if stored is None:
        return None
    try:
        vmin, vmax = float(stored["vmin"]), float(stored["vmax"])
    except (TypeError, KeyError, ValueError):
        vmin = vmax = math.nan
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmin < vmax):
        raise BankFormatError(f"{where}: display_range must be {{vmin, vmax}} with finite vmin < vmax, got {stored!r}")
    return ColorScale(vmin, vmax, "bank")


@dataclass(frozen=True)
class BankScorer:
    """A saved bank ready to judge single images. Not thread-safe: serialise `inspect` calls."""

    model: PatchCore
    bank: MemoryBank
    preprocess: Preprocess
    category: str
    threshold: float | None
    display: ColorScale | None = None  # the bank-wide colour scale, when the bank or a threshold gives one

    @classmethod
    def load(cls, bank_path: str | Path, device: str = "auto", threshold: float | None = None) -> "BankScorer":
        """Load and verify the bank; `threshold` overrides the bank's calibrated one (if any)."""
        bank = MemoryBank.load(bank_path)
        model = PatchCore.from_bank(bank, device=device)
        pre = bank.metadata.get("preprocess", {})
        # [0, 1] tensors: the backbone normalises with its own statistics (as in fitting)
        preprocess = Preprocess(resize=pre.get("resize", 256), crop=pre.get("crop", 224),
                                mean=(0.0,) * 3, std=(1.0,) * 3)
        stored = bank.metadata.get("threshold")
        if threshold is None and stored:
            threshold = float(stored["value"])
        display = stored_color_scale(bank.metadata, str(bank_path)) or threshold_color_scale(threshold)
        return cls(model, bank, preprocess, str(bank.metadata.get("category", "unknown")), threshold, display)

    def inspect(self, image: torch.Tensor) -> Inspection:
        """image (3, H, W) preprocessed by `self.preprocess` -> its Inspection."""
        with torch.inference_mode():
            patches = self.model.patch_scores(image[None])  # (1, h, w)
            score, amap = self.model.scores_from_patches(patches, tuple(image.shape[-2:]))
        return Inspection(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), float(score[0]),
                          amap[0].float().cpu().numpy(), patches[0].float().cpu().numpy())

    def is_defective(self, score: float) -> bool | None:
        """True when the score is strictly above the threshold; None without a threshold."""
        return None if self.threshold is None else score > self.threshold

    def decide(self, score: float) -> Literal["accept", "reject", "uncalibrated"]:
        """The word the line sees: reject above the threshold, accept otherwise, uncalibrated
        without a threshold (a score alone is no decision)."""
        defective = self.is_defective(score)
        return "uncalibrated" if defective is None else ("reject" if defective else "accept")

    def color_scale(self, result: Inspection) -> ColorScale:
        """The bank-wide scale when there is one, else this image's 1st percentile to its maximum."""
        if self.display is not None:
            return self.display
        return ColorScale(float(np.percentile(result.amap, 1)), float(result.amap.max()), "image")


def threshold_color_scale(threshold: float | None) -> ColorScale | None:
    """0 to `THRESHOLD_SPAN` x threshold: distances are >= 0, so nothing is clipped below, the
    threshold sits mid-scale (green in jet) and warm colours mean above it; None without one."""
    if threshold is None or not threshold > 0:
        return None
    return ColorScale(0.0, THRESHOLD_SPAN * threshold, "threshold")


def overlay_names(paths: Sequence[Path]) -> list[str]:
    """One distinct PNG name per input: its path relative to the inputs' common folder, separators
    as "__" (a/000.png, b/000.png -> a__000.png, b__000.png); a repeat gets -2, -3, ... So two
    parts with the same file name never share (or overwrite) an overlay."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    names, taken = [], set()
    for path in absolute:
        stem = "__".join(path.relative_to(common).with_suffix("").parts)
        name, n = f"{stem}.png", 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        names.append(name)
    return names


def _read_images(paths: Sequence[Path], scorer: BankScorer) -> list[dict[str, Any]]:
    """Every image read and validated before any is scored, so a bad file costs no output."""
    records = [ImageRecord(path=p, category=scorer.category, label=0, defect="unknown", split="test") for p in paths]
    dataset = ImageDataset(records, scorer.preprocess)
    return [dataset[i] for i in range(len(dataset))]


def predict_images(args: argparse.Namespace) -> int:
    """Score each image, draw its overlay and write results.csv / results.json beside them."""
    paths = [Path(p) for p in args.images]
    for p in paths:  # before the bank and backbone load: a typo fails at once
        if not p.is_file():
            raise DataError(f"image not found: {p}")
    scorer = BankScorer.load(args.bank, device=args.device, threshold=args.threshold)
    items = _read_images(paths, scorer)
    out = new_run_dir("results", "predict", args.out)
    rows = []
    for path, item, name in zip(paths, items, overlay_names(paths)):
        result = scorer.inspect(item["image"])
        decision, scale = scorer.decide(result.score), scorer.color_scale(result)
        overlay = plots.overlay(result.image, result.amap, None, out / name,
                                f"{path}: score {result.score:.4g} -> {decision}",
                                scale.vmin, scale.vmax, scorer.threshold)
        rows.append({"image": str(path), "score": result.score, "threshold": scorer.threshold,
                     "decision": decision, "overlay": str(overlay), "color_scale": scale.source})
    write_table(out / "results.csv", rows)
    write_json(out / "results.json", {"bank": str(args.bank), "category": scorer.category, "images": rows})
    print(format_table(rows, ("image", "score", "threshold", "decision", "overlay")))
    print(f"results: {out / 'results.csv'}")
    if scorer.threshold is None:
        print("no threshold: pass --threshold, or fit with a validation split to calibrate one")
    return 0
