"""From a `data:` config section to records: which categories, which images, which geometry.

The one place that knows the dataset formats by name, so the command line, the federation's
clients and the benchmarks all read data the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from patchcore.config import DataConfig
from patchcore.data.autovi import AUTOVI_CATEGORIES, load_autovi
from patchcore.data.coverage import warn_lost_area
from patchcore.data.mvtec import has_validation, list_categories, load_mvtec, load_mvtec3d_rgb
from patchcore.data.records import ImageRecord
from patchcore.data.synthetic import Difficulty, make_synthetic_dataset
from patchcore.data.transforms import Preprocess
from patchcore.errors import ConfigError, DataError

DEFAULT_SYNTHETIC_CACHE = Path(".cache") / "synthetic"


def data_root(data: DataConfig, seed: int = 0) -> Path:
    """The dataset folder; for `synthetic`, generated on first use (a seeded, offline dataset)."""
    if data.format != "synthetic":
        if not data.root:
            raise ConfigError("data.root is empty: give the dataset folder (config, --data-root or FEDPATCH_DATA_ROOT)")
        return Path(data.root).expanduser()
    s = data.synthetic
    difficulty = Difficulty(s.defect_contrast, s.defect_size, s.texture_variation, s.lighting_variation)
    params = {"categories": list(s.categories), "size": s.size, "n_train": s.n_train,
              "n_test_good": s.n_test_good, "n_test_defect": s.n_test_defect, "seed": seed,
              **difficulty.params()}  # {} when classic: the classic datasets' hashes are unchanged
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(data.root).expanduser() if data.root else DEFAULT_SYNTHETIC_CACHE / digest
    return make_synthetic_dataset(root, s.categories, s.n_train, s.n_test_good, s.n_test_defect, s.size, seed,
                                  difficulty)


def categories(data: DataConfig, root: Path) -> list[str]:
    """The configured categories, or every category found under the root."""
    if data.categories:
        return list(data.categories)
    if data.format == "synthetic":
        return list(data.synthetic.categories)
    found = list_categories(root)
    if data.format == "autovi":
        found = [c for c in found if c in AUTOVI_CATEGORIES] or found
    if not found:
        raise DataError(f"no categories found under {root}")
    return found


def load_records(data: DataConfig, root: Path, category: str, holdout: float = 0.0,
                 seed: int = 0) -> list[ImageRecord]:
    """Records of one category in the configured format: train, test, and validation when present.

    Without a validation split, `holdout` > 0 moves that share of the training normals to the
    validation split (`hold_out`), so a threshold can be calibrated on images the bank never saw."""
    splits: tuple[str, ...] = ("train", "test")
    if data.format in ("mvtec", "mvtec3d", "synthetic") and has_validation(root, category):
        splits += ("validation",)
    if data.format == "autovi":
        records = load_autovi(root, category, splits=splits, require_masks=data.require_masks)
    else:
        loader = load_mvtec3d_rgb if data.format == "mvtec3d" else load_mvtec
        records = loader(root, category, splits=splits, require_masks=data.require_masks)
    warn_lost_area(model_preprocess(data), records, category, key=(str(root),))
    return hold_out(records, holdout, seed) if holdout > 0 and "validation" not in splits else records


def hold_out(records: list[ImageRecord], share: float, seed: int) -> list[ImageRecord]:
    """`records` with ceil(share · n) of the n training normals re-labelled split "validation"
    (held_out=True), drawn by `seed` from the path-sorted list: the same images whatever the
    order records arrive in, so a centralized fit and a federation hold out the same ones.
    At least one image stays in training; categories with fewer than 2 training images are left
    as they are."""
    train = sorted((r for r in records if r.split == "train"), key=lambda r: str(r.path))
    if len(train) < 2:
        return records
    count = min(len(train) - 1, max(1, math.ceil(share * len(train))))
    chosen = {train[i].path for i in np.random.default_rng(seed).permutation(len(train))[:count]}
    return [dataclasses.replace(r, split="validation", held_out=True) if r.split == "train" and r.path in chosen
            else r for r in records]


def model_preprocess(data: DataConfig) -> Preprocess:
    """Resize + crop to [0, 1] tensors: the backbone normalises with its own statistics."""
    return Preprocess(resize=data.resize, crop=data.crop, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
