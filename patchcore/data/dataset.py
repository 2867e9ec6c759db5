"""`ImageDataset`: records -> tensors, with an optional per-domain shift before preprocessing.

The dataset reads pixels lazily (one file per `__getitem__`), applies the record's domain shift
to image and mask together, then the shared `Preprocess` geometry. Every item has a mask tensor,
so batches stack without special cases; `has_mask` says whether that mask is ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from patchcore.data.images import read_image, union_mask
from patchcore.data.records import ImageRecord
from patchcore.data.transforms import PairTransform, Preprocess
from patchcore.errors import ConfigError


class ImageDataset(Dataset):
    """A map-style dataset over `ImageRecord`s.

    Items are dicts: `image` (3, h, w) float32 normalised; `mask` (1, h, w) float32 in {0, 1};
    `label` int; `has_mask` bool; `index` int (position in `records`); `original_size` (2,)
    int64 (H, W) of the file, for mapping anomaly maps back to full resolution.

    `has_mask` is True when `mask` is ground truth: always for good images (their truth is all
    zeros) and for anomalous images with mask files; False for anomalous images without masks,
    which count for image metrics only. `pair_transforms` maps a record's `domain` to its shift;
    a record whose domain is None or not a key is left unshifted.
    """

    def __init__(self, records: Sequence[ImageRecord], preprocess: Preprocess | None = None,
                 pair_transforms: Mapping[str, PairTransform] | None = None) -> None:
        self.records = list(records)
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.pair_transforms = dict(pair_transforms or {})

    def __len__(self) -> int:
        return len(self.records)

    def shift_for(self, record: ImageRecord) -> PairTransform | None:
        if record.domain is None:
            return None
        return self.pair_transforms.get(record.domain)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = read_image(record.path)
        width, height = image.size
        mask = (union_mask(record.mask_paths, image.size, image=record.path)
                if record.mask_paths else None)
        shift = self.shift_for(record)
        if shift is not None:
            image, mask = shift(image, mask)
        image_tensor = self.preprocess.image(image)  # (3, h, w)
        if mask is not None:
            mask_tensor = self.preprocess.mask(mask).to(torch.float32)  # (1, h, w)
        else:
            mask_tensor = torch.zeros((1, *image_tensor.shape[-2:]), dtype=torch.float32)
        return {
            "image": image_tensor,
            "mask": mask_tensor,
            "label": int(record.label),
            "has_mask": bool(record.label == 0 or record.mask_paths),
            "index": int(index),
            "original_size": torch.tensor([height, width], dtype=torch.int64),
        }


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch: image (B, 3, h, w), mask (B, 1, h, w), label/index (B,) int64,
    has_mask (B,) bool, original_size (B, 2). Images must share one size (they do after a
    fixed resize+crop; with crop=None and mixed aspect ratios use batch_size=1)."""
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        raise ConfigError(f"cannot batch images of different sizes {sorted(shapes)}: set "
                          f"data.crop or an exact (h, w) data.resize, or data.batch_size: 1")
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "mask": torch.stack([item["mask"] for item in batch]),
        "label": torch.tensor([item["label"] for item in batch], dtype=torch.int64),
        "has_mask": torch.tensor([item["has_mask"] for item in batch], dtype=torch.bool),
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.int64),
        "original_size": torch.stack([item["original_size"] for item in batch]),
    }


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0,
                shuffle: bool = False) -> DataLoader:
    """A DataLoader with `collate`; keeps order unless `shuffle` (feature order = record order)."""
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate, persistent_workers=num_workers > 0)
