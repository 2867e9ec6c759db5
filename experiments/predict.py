"""Score single images with a saved bank: `fedpatch predict` here, the inspection API in serve.py.

`BankScorer` is the part both share: a bank loaded once with the model, preprocessing and
threshold it was fitted with, and `inspect(image)` giving the score, the pixel map and the patch
grid of one image. The two front ends only differ in how they word and ship the answer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments import plots
from experiments.image_results import patch_box
from experiments.reports import format_table
from experiments.runs import new_run_dir
from patchcore.data import ImageDataset, ImageRecord
from patchcore.data.transforms import Preprocess
from patchcore.errors import DataError
from patchcore.memory_bank import MemoryBank
from patchcore.model import PatchCore


@dataclass(frozen=True)
class Inspection:
    """One scored image, on the CPU."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]: the model's input
    score: float  # image score = max patch score
    amap: np.ndarray  # (H, W) float32 pixel anomaly map
    patches: np.ndarray  # (h, w) float32 patch-score grid

    def color_range(self) -> tuple[float, float]:
        """(vmin, vmax) for drawing the map: its 1st percentile to its maximum."""
        return float(np.percentile(self.amap, 1)), float(self.amap.max())

    def max_patch_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive, in input pixels: the grid cell with the highest patch
        score, i.e. the patch whose distance became the image score (image_results.patch_box)."""
        return patch_box(self.patches, tuple(self.amap.shape))


@dataclass(frozen=True)
class BankScorer:
    """A saved bank ready to judge single images. Not thread-safe: serialise `inspect` calls."""

    model: PatchCore
    bank: MemoryBank
    preprocess: Preprocess
    category: str
    threshold: float | None

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
        return cls(model, bank, preprocess, str(bank.metadata.get("category", "unknown")), threshold)

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


def predict_images(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"image not found: {p}")
    scorer = BankScorer.load(args.bank, device=args.device, threshold=args.threshold)
    records = [ImageRecord(path=p, category=scorer.category, label=0, defect="unknown", split="test") for p in paths]
    dataset = ImageDataset(records, scorer.preprocess)
    items = [dataset[i] for i in range(len(dataset))]  # reads (and validates) every image first
    out = new_run_dir("results", "predict", args.out)
    threshold = scorer.threshold
    rows = []
    for record, item in zip(records, items):
        result = scorer.inspect(item["image"])
        defective = scorer.is_defective(result.score)
        decision = "uncalibrated" if defective is None else ("FAIL" if defective else "PASS")
        overlay = plots.overlay(result.image, result.amap, None, out / f"{record.path.stem}.png",
                                f"{record.path.name}: score {result.score:.4g} -> {decision}",
                                *result.color_range(), threshold)
        rows.append({"image": str(record.path), "score": result.score, "threshold": threshold,
                     "decision": decision, "overlay": str(overlay)})
    print(format_table(rows, ("image", "score", "threshold", "decision", "overlay")))
    if threshold is None:
        print("no threshold: pass --threshold, or fit with a validation split to calibrate one")
    return 0
