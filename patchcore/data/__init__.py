"""Data: dataset layouts -> `ImageRecord`s -> tensors.

Loaders (`load_mvtec`, `load_mvtec3d_rgb`, `load_autovi`) only list files; `ImageDataset`
reads pixels; `Preprocess` owns the geometry shared by images, masks and anomaly maps;
`make_synthetic_dataset` writes an offline dataset in the MVTec AD layout.
"""

import importlib
from typing import Any

# Each name is imported on first use (PEP 562): `patchcore.data.records` (and so the config and
# the partition vocabulary the CLI validates first) stays free of torch.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "autovi": ("AUTOVI_CATEGORIES", "AUTOVI_IMAGE_SIZES", "DefectSpec", "load_autovi", "load_defects_config",
               "read_region"),
    "dataset": ("ImageDataset", "collate", "make_loader"),
    "images": ("IMAGE_EXTENSIONS", "image_size", "list_images", "read_array", "read_image", "read_mask",
               "union_mask"),
    "mvtec": ("has_validation", "list_categories", "load_mvtec", "load_mvtec3d_rgb"),
    "records": ("GOOD", "ImageRecord"),
    "synthetic": ("DEFECTS", "SYNTHETIC_CATEGORIES", "SyntheticSample", "image_rng", "make_synthetic_dataset",
                  "render_sample"),
    "transforms": ("IMAGENET_MEAN", "IMAGENET_STD", "PairTransform", "Preprocess"),
}
_LAZY = {name: f"{__name__}.{module}" for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
