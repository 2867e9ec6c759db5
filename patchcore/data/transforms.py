"""Preprocessing: one geometry for images and masks, and its inverse for anomaly maps.

`Preprocess` resizes and center-crops like the PatchCore reference pipeline (Resize 256,
CenterCrop 224, ImageNet normalisation). The geometry is computed once here (`resized_size`,
`crop_box`) and used for the image, the mask and the inverse, so a defect pixel lands on the same
patch in all three. `PairTransform` is the interface of per-factory domain shifts that move an
image and its mask together before preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from PIL import Image
from torchvision.transforms import InterpolationMode

from patchcore.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class PairTransform(Protocol):
    """Changes an image and (when given) its mask consistently, before resize/crop."""

    def __call__(self, image: Image.Image,
                 mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]: ...


def _as_pair(value: int | tuple[int, int] | list[int], key: str) -> tuple[int, int] | int:
    """Validate an int or (h, w) size; lists (from YAML) become tuples."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an int or (height, width), got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"{key} must be an int or (height, width) of ints >= 1, got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """Resize, center-crop and normalise.

    `resize`: an int resizes the shorter side to it keeping the aspect ratio (torchvision Resize
    semantics: the longer side is truncated, not rounded); a (h, w) tuple resizes exactly.
    `crop`: center crop to an int square or (h, w); None keeps the resized frame.
    """

    resize: int | tuple[int, int] = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", _as_pair(self.resize, "resize"))
        if self.crop is not None:
            object.__setattr__(self, "crop", _as_pair(self.crop, "crop"))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values each and std > 0, got "
                              f"{self.mean}, {self.std}")
        if self.crop is not None:
            crop_h, crop_w = self._crop_hw()
            limit = self.resize if isinstance(self.resize, tuple) else (self.resize, self.resize)
            if crop_h > limit[0] or crop_w > limit[1]:
                raise ConfigError(f"crop {self.crop} is larger than resize {self.resize}")

    def _crop_hw(self) -> tuple[int, int]:
        crop = self.crop
        return (crop, crop) if isinstance(crop, int) else crop  # type: ignore[return-value]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) after resizing an image of `width` x `height`."""
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the center crop inside a resized frame of `height` x `width`,
        rounded like torchvision's center_crop."""
        if self.crop is None:
            return 0, 0, height, width
        crop_h, crop_w = self._crop_hw()
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
        return top, left, crop_h, crop_w

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the tensor that `image`/`mask` produce for a `width` x `height` input."""
        _, _, crop_h, crop_w = self.crop_box(*self.resized_size(width, height))
        return crop_h, crop_w

    def _geometry(self, tensor: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
        """Resize then crop a (C, H, W) tensor (masks: images go through PIL, see `image`)."""
        height, width = tensor.shape[-2:]
        size = self.resized_size(width, height)
        tensor = tvf.resize(tensor, list(size), interpolation=interpolation, antialias=False)
        top, left, crop_h, crop_w = self.crop_box(*size)
        return tvf.crop(tensor, top, left, crop_h, crop_w)

    def image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised float32 (3, h, w).

        Resized by PIL itself (bilinear, PIL's own antialiasing), exactly as the official
        pipeline's torchvision `Resize` does on a PIL image: the same uint8 pixels. torchvision's
        tensor resize differs from PIL by one step in ~1e-4 of the values of a 300 x 400 tire
        image, enough to reorder near-tied image scores (experiments/studies/fidelity_official.md).
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = self.resized_size(*image.size)
        image = image.resize((width, height), Image.BILINEAR)
        top, left, crop_h, crop_w = self.crop_box(height, width)
        tensor = tvf.pil_to_tensor(image)[:, top:top + crop_h, left:left + crop_w]  # (3, h, w) uint8
        tensor = tensor.to(torch.float32).div_(255.0)
        return tvf.normalize(tensor, list(self.mean), list(self.std))

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """PIL mask (nonzero = defect) -> bool (1, h, w) with the image's geometry.

        NEAREST_EXACT samples at pixel centres, as bilinear resizing does, so mask and image stay
        aligned; torchvision's plain NEAREST floors the source index and shifts edges by up to a
        source pixel.
        """
        if mask.mode != "L":
            mask = mask.convert("L")
        tensor = tvf.pil_to_tensor(mask)  # (1, H, W) uint8
        tensor = self._geometry(tensor, InterpolationMode.NEAREST_EXACT)
        return tensor > 0

    def invert_to_original(self, anomaly_map: torch.Tensor,
                           original: tuple[int, int]) -> torch.Tensor:
        """Map a (h, w) or (N, h, w) map on the crop back to the original (H, W) resolution.

        The crop is placed back into the resized frame; the frame's border outside the crop is
        filled with the map's nearest edge values (replicate padding), because the model never
        saw those pixels and an edge value is the least surprising guess (zeros would invent
        confident "normal" regions). The frame is then resized bilinearly to (H, W). Used to
        evaluate at the original resolution, as the AutoVI evaluation requires.
        """
        height, width = original
        frame_h, frame_w = self.resized_size(width, height)
        top, left, crop_h, crop_w = self.crop_box(frame_h, frame_w)
        if tuple(anomaly_map.shape[-2:]) != (crop_h, crop_w) or anomaly_map.dim() not in (2, 3):
            raise ValueError(f"anomaly map of shape {tuple(anomaly_map.shape)} does not match "
                             f"the crop (h, w) = {(crop_h, crop_w)} for original {original}")
        squeeze = anomaly_map.dim() == 2
        maps = anomaly_map.reshape(-1, 1, crop_h, crop_w).to(torch.float32)  # (N, 1, h, w)
        pad = (left, frame_w - left - crop_w, top, frame_h - top - crop_h)
        if any(pad):
            maps = nnf.pad(maps, pad, mode="replicate")  # (N, 1, frame_h, frame_w)
        maps = nnf.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False,
                               antialias=height < frame_h or width < frame_w)
        return maps[:, 0] if not squeeze else maps[0, 0]
