"""`ImageRecord`: the one description of an image that flows through fedpatch.

Records are plain, hashable values: loaders produce them, partitions split them, datasets read
them. Nothing here touches pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

GOOD = "good"


@dataclass(frozen=True)
class ImageRecord:
    """One image and what is known about it.

    `mask_paths` holds zero or more ground-truth masks whose union is the image's defect mask
    (MVTec AD has one file per image, AutoVI one file per defect region). An anomalous image with
    no mask has `mask_paths == ()`: it counts for image metrics but not for pixel metrics.
    `domain` names the factory/domain whose shift applies to this image (None: no shift).
    """

    path: Path
    category: str
    label: int  # 0 = good, 1 = anomalous
    defect: str  # "good" or the defect type (folder name)
    split: str  # "train" | "validation" | "test"
    mask_paths: tuple[Path, ...] = ()
    domain: str | None = None
    held_out: bool = False  # a training normal held out to calibrate the threshold (threshold.holdout)

    @property
    def is_anomalous(self) -> bool:
        return self.label == 1

    def with_domain(self, domain: str | None) -> "ImageRecord":
        return replace(self, domain=domain)
