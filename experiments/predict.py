"""`fedpatch predict`: score single images with a saved bank; print and draw the decision."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments import plots
from experiments.reports import format_table
from experiments.runs import new_run_dir
from patchcore.data import ImageDataset, ImageRecord
from patchcore.data.transforms import Preprocess
from patchcore.errors import DataError
from patchcore.memory_bank import MemoryBank
from patchcore.model import PatchCore


def predict_images(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"image not found: {p}")
    bank = MemoryBank.load(args.bank)
    model = PatchCore.from_bank(bank, device=args.device)
    pre = bank.metadata.get("preprocess", {})
    crop = pre.get("crop", 224)
    preprocess = Preprocess(resize=pre.get("resize", 256), crop=crop, mean=(0.0,) * 3, std=(1.0,) * 3)
    category = bank.metadata.get("category", "unknown")
    records = [ImageRecord(path=p, category=category, label=0, defect="unknown", split="test") for p in paths]
    dataset = ImageDataset(records, preprocess)
    stored = bank.metadata.get("threshold")
    threshold = args.threshold if args.threshold is not None else (stored["value"] if stored else None)
    items = [dataset[i] for i in range(len(dataset))]  # reads (and validates) every image first
    out = new_run_dir("results", "predict", args.out)
    rows = []
    for record, item in zip(records, items):
        score, amap = model.score_batch(item["image"][None])
        score, amap = float(score[0]), amap[0].cpu().numpy()
        decision = "uncalibrated" if threshold is None else ("FAIL" if score > threshold else "PASS")
        image = item["image"].permute(1, 2, 0).clamp(0, 1).numpy()
        overlay = plots.overlay(image, amap, None, out / f"{record.path.stem}.png",
                                f"{record.path.name}: score {score:.4g} -> {decision}",
                                float(np.percentile(amap, 1)), float(amap.max()), threshold)
        rows.append({"image": str(record.path), "score": score, "threshold": threshold,
                     "decision": decision, "overlay": str(overlay)})
    print(format_table(rows, ("image", "score", "threshold", "decision", "overlay")))
    if threshold is None:
        print("no threshold: pass --threshold, or fit with a validation split to calibrate one")
    return 0
