"""From a `data:` config section to records: which categories, which images, which geometry.

The one place that knows the dataset formats by name, so the command line, the federation's
clients and the benchmarks all read data the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from patchcore.config import DataConfig
from patchcore.data.autovi import AUTOVI_CATEGORIES, load_autovi
from patchcore.data.mvtec import has_validation, list_categories, load_mvtec, load_mvtec3d_rgb
from patchcore.data.records import ImageRecord
from patchcore.data.synthetic import make_synthetic_dataset
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
    params = {"categories": list(s.categories), "size": s.size, "n_train": s.n_train,
              "n_test_good": s.n_test_good, "n_test_defect": s.n_test_defect, "seed": seed}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(data.root).expanduser() if data.root else DEFAULT_SYNTHETIC_CACHE / digest
    return make_synthetic_dataset(root, s.categories, s.n_train, s.n_test_good, s.n_test_defect, s.size, seed)


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


def load_records(data: DataConfig, root: Path, category: str) -> list[ImageRecord]:
    """Records of one category in the configured format: train, test, and validation when present."""
    splits: tuple[str, ...] = ("train", "test")
    if data.format in ("mvtec", "mvtec3d", "synthetic") and has_validation(root, category):
        splits += ("validation",)
    if data.format == "autovi":
        return load_autovi(root, category, splits=splits, require_masks=data.require_masks)
    loader = load_mvtec3d_rgb if data.format == "mvtec3d" else load_mvtec
    return loader(root, category, splits=splits, require_masks=data.require_masks)


def model_preprocess(data: DataConfig) -> Preprocess:
    """Resize + crop to [0, 1] tensors: the backbone normalises with its own statistics."""
    return Preprocess(resize=data.resize, crop=data.crop, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
