"""Per-factory domain shift: each factory's camera and lighting differ a little.

Real factories photograph the same product with different cameras, lamps and fixtures. A
`DomainShift` imitates that with a few modest, deterministic changes: photometric ones (gain,
brightness, contrast, gamma, an illumination gradient) that touch the image only, and a geometric
one (rotation + translation) that moves image and defect mask together so the ground truth stays
true. A shift is a PairTransform: `shift(image, mask) -> (image, mask)`, applied to a record
whose `domain` names the factory, before resize/crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from federated.config import SHIFT_FAMILIES
from federated.partition import factory_name
from patchcore.errors import ConfigError

# Ranges at strength 1.0; strength scales them (0 -> identity).
BRIGHTNESS = 0.15  # additive, fraction of full scale
CONTRAST = 1.15  # multiplicative factor in [1/1.15, 1.15]
GAIN = 1.10  # per-channel factor in [1/1.1, 1.1]
GAMMA = 1.15  # exponent in [1/1.15, 1.15]
GRADIENT = 0.25  # illumination factor varies by +-strength across the image
ROTATION = 5.0  # degrees
TRANSLATION = 0.04  # fraction of width/height
_STREAM = 0x5F1F7  # keeps shift draws independent of partition draws with the same seed


@dataclass(frozen=True)
class DomainShift:
    """One factory's shift; the defaults are the identity.

    `translation` is a fraction of (width, height), not pixels: the shift runs before resizing,
    on images whose size varies by dataset, and the same factory should move every image by the
    same relative amount. Positive rotation is counter-clockwise on screen (as in PIL).
    """

    brightness: float = 0.0
    contrast: float = 1.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    gradient_angle: float = 0.0  # degrees; direction in which illumination increases
    gradient_strength: float = 0.0
    rotation: float = 0.0  # degrees
    translation: tuple[float, float] = (0.0, 0.0)  # (dx, dy) as fractions of (W, H)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gains", tuple(float(g) for g in self.gains))
        object.__setattr__(self, "translation", tuple(float(t) for t in self.translation))
        if len(self.gains) != 3 or min(self.gains) < 0:
            raise ConfigError(f"shift gains must be 3 values >= 0, got {self.gains}")
        if len(self.translation) != 2:
            raise ConfigError(f"shift translation must be (dx, dy), got {self.translation}")
        if self.contrast < 0 or self.gamma <= 0:
            raise ConfigError(f"shift contrast must be >= 0 and gamma > 0, got "
                              f"{self.contrast}, {self.gamma}")
        if not 0 <= self.gradient_strength < 1:
            raise ConfigError(f"shift gradient_strength must be in [0, 1), got "
                              f"{self.gradient_strength}")

    @property
    def is_photometric_identity(self) -> bool:
        return (self.brightness == 0 and self.contrast == 1 and self.gains == (1.0, 1.0, 1.0)
                and self.gamma == 1 and self.gradient_strength == 0)

    @property
    def is_geometric_identity(self) -> bool:
        return self.rotation == 0 and self.translation == (0.0, 0.0)

    def __call__(self, image: Image.Image,
                 mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
        """Apply the shift: photometric to the image only, geometric to image and mask alike."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if not self.is_photometric_identity:
            image = self._photometric(image)
        if not self.is_geometric_identity:
            image = self._geometric(image, order=1)  # bilinear
            if mask is not None:
                mask = self._geometric(mask, order=0)  # nearest: stays 0/255
        return image, mask

    def _photometric(self, image: Image.Image) -> Image.Image:
        x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        x = x * np.asarray(self.gains, dtype=np.float32) + self.brightness
        mean = float(x.mean())
        x = (x - mean) * self.contrast + mean
        if self.gradient_strength > 0:
            x = x * self._illumination(x.shape[0], x.shape[1])[..., None]
        x = np.clip(x, 0.0, 1.0) ** self.gamma
        return Image.fromarray(np.round(x * 255.0).astype(np.uint8), mode="RGB")

    def _illumination(self, height: int, width: int) -> np.ndarray:
        """(H, W) factor in [1 - s, 1 + s], linear along `gradient_angle`."""
        ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]  # (H, 1)
        xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]  # (1, W)
        phi = math.radians(self.gradient_angle)
        c, s = math.cos(phi), -math.sin(phi)  # screen y points down
        ramp = (xs * c + ys * s) / (abs(c) + abs(s))  # (H, W) in [-1, 1]
        return 1.0 + self.gradient_strength * ramp

    def _geometric(self, image: Image.Image, order: int) -> Image.Image:
        """Rotate about the centre, then translate; borders are filled by reflection so no
        black corners appear (which the model could learn as 'normal' or flag as anomalies).
        Image and mask use the same mapping and the same border mode, so they stay aligned."""
        arr = np.asarray(image)  # (H, W) or (H, W, C) uint8
        height, width = arr.shape[:2]
        matrix, offset = self._inverse_map(height, width)
        channels = arr[..., None] if arr.ndim == 2 else arr
        out = np.empty(channels.shape, dtype=np.float64)
        for ch in range(channels.shape[2]):
            ndimage.affine_transform(channels[..., ch].astype(np.float64), matrix, offset,
                                     output=out[..., ch], order=order, mode="reflect")
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
        return Image.fromarray(out[..., 0] if arr.ndim == 2 else out, mode=image.mode)

    def _inverse_map(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(matrix, offset) with input_rc = matrix @ output_rc + offset, in (row, col) order."""
        theta = math.radians(self.rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        forward = np.array([[cos, -sin], [sin, cos]])  # (row, col); CCW on screen
        centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
        shift = np.array([self.translation[1] * height, self.translation[0] * width])
        matrix = forward.T  # inverse of a rotation
        offset = centre - matrix @ (centre + shift)
        return matrix, offset


def sample_shift(factory_index: int, seed: int, strength: float = 1.0) -> DomainShift:
    """Draw factory `factory_index`'s shift; deterministic in (factory_index, seed).

    `strength` scales every range (0 gives the identity, 1 the modest defaults above).
    """
    if factory_index < 0 or seed < 0:
        raise ConfigError(f"shift factory_index and seed must be >= 0, got {factory_index}, "
                          f"{seed}")
    if not strength >= 0:
        raise ConfigError(f"shift strength must be >= 0, got {strength}")
    rng = np.random.default_rng([seed, factory_index, _STREAM])
    u = rng.uniform(-1.0, 1.0, size=10) * strength  # (10,) signed, scaled draws
    angle = float(rng.uniform(0.0, 360.0))
    return DomainShift(
        brightness=float(BRIGHTNESS * u[0]),
        contrast=float(CONTRAST ** u[1]),
        gains=tuple(float(GAIN ** g) for g in u[2:5]),
        gamma=float(GAMMA ** u[5]),
        gradient_angle=angle if strength > 0 else 0.0,
        gradient_strength=float(min(GRADIENT * abs(u[6]), 0.9)),
        rotation=float(ROTATION * u[7]),
        translation=(float(TRANSLATION * u[8]), float(TRANSLATION * u[9])),
    )


# The shift families a study can turn on alone: what each keeps of a drawn shift (the config's list).
FAMILIES = SHIFT_FAMILIES


def restrict(shift: DomainShift, families: tuple[str, ...] | list[str]) -> DomainShift:
    """`shift` with only the named families kept: photometric (brightness, contrast, gains,
    gamma), illumination (the gradient), geometric (rotation, translation)."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ConfigError(f"federation.shift_families: unknown {unknown}; valid: {', '.join(FAMILIES)}")
    keep = {}
    if "photometric" in families:
        keep.update(brightness=shift.brightness, contrast=shift.contrast, gains=shift.gains, gamma=shift.gamma)
    if "illumination" in families:
        keep.update(gradient_angle=shift.gradient_angle, gradient_strength=shift.gradient_strength)
    if "geometric" in families:
        keep.update(rotation=shift.rotation, translation=shift.translation)
    return DomainShift(**keep)


def shifts_for_factories(num_factories: int, seed: int, strength: float = 1.0,
                         families: tuple[str, ...] = FAMILIES,
                         shifted: int | None = None) -> dict[str, DomainShift]:
    """{factory name: shift}, keyed like `ImageRecord.domain` after `partition`; only the first
    `shifted` factories (None: all) are shifted, each with the `families` of its draw."""
    count = num_factories if shifted is None else min(shifted, num_factories)
    return {factory_name(k): restrict(sample_shift(k, seed, strength), families) for k in range(count)}
