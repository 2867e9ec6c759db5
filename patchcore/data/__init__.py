"""Data: dataset layouts -> `ImageRecord`s -> tensors.

Loaders (`load_mvtec`, `load_mvtec3d_rgb`, `load_autovi`) only list files; `ImageDataset`
reads pixels; `Preprocess` owns the geometry shared by images, masks and anomaly maps;
`make_synthetic_dataset` writes an offline dataset in the MVTec AD layout.
"""

from patchcore.data.autovi import (
    AUTOVI_CATEGORIES,
    AUTOVI_IMAGE_SIZES,
    DefectSpec,
    load_autovi,
    load_defects_config,
    read_region,
)
from patchcore.data.dataset import ImageDataset, collate, make_loader
from patchcore.data.images import (
    IMAGE_EXTENSIONS,
    image_size,
    list_images,
    read_array,
    read_image,
    read_mask,
    union_mask,
)
from patchcore.data.mvtec import (
    has_validation,
    list_categories,
    load_mvtec,
    load_mvtec3d_rgb,
)
from patchcore.data.records import GOOD, ImageRecord
from patchcore.data.synthetic import (
    DEFECTS,
    SYNTHETIC_CATEGORIES,
    SyntheticSample,
    image_rng,
    make_synthetic_dataset,
    render_sample,
)
from patchcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PairTransform, Preprocess

__all__ = [
    "AUTOVI_CATEGORIES", "AUTOVI_IMAGE_SIZES", "DEFECTS", "GOOD", "IMAGENET_MEAN",
    "IMAGENET_STD", "IMAGE_EXTENSIONS", "SYNTHETIC_CATEGORIES", "DefectSpec", "ImageDataset",
    "ImageRecord", "PairTransform", "Preprocess", "SyntheticSample", "collate", "has_validation",
    "image_rng", "image_size", "list_categories", "list_images", "load_autovi",
    "load_defects_config", "load_mvtec", "load_mvtec3d_rgb", "make_loader",
    "make_synthetic_dataset", "read_array", "read_image", "read_mask", "read_region",
    "render_sample", "union_mask",
]
