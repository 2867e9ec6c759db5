"""Domain shift: identity, geometric alignment of image and mask, photometric-only, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from federated.shift import DomainShift, sample_shift, shifts_for_factories
from patchcore.errors import ConfigError


def painted(height: int = 80, width: int = 100) -> tuple[Image.Image, Image.Image]:
    """A textured RGB image with a bright square and its 0/255 mask."""
    rng = np.random.default_rng(0)
    img = rng.integers(40, 120, size=(height, width, 3), dtype=np.uint8)
    img[30:40, 40:52] = (250, 250, 250)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[30:40, 40:52] = 255
    return Image.fromarray(img, "RGB"), Image.fromarray(mask, "L")


def square_box(arr: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(arr)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def test_identity_is_pixel_identical() -> None:
    image, mask = painted()
    for shift in (DomainShift(), sample_shift(3, seed=11, strength=0.0)):
        assert shift.is_photometric_identity and shift.is_geometric_identity
        out, out_mask = shift(image, mask)
        assert np.array_equal(np.asarray(out), np.asarray(image))
        assert np.array_equal(np.asarray(out_mask), np.asarray(mask))


def test_translation_moves_square_in_image_and_mask_identically() -> None:
    image, mask = painted()
    shift = DomainShift(translation=(0.1, 0.05))  # 10 px right, 4 px down on 100 x 80
    out, out_mask = shift(image, mask)
    m = np.asarray(out_mask)
    assert set(np.unique(m)) <= {0, 255}
    assert square_box(m) == (34, 43, 50, 61)
    bright = (np.asarray(out) == 250).all(axis=2)
    assert square_box(bright) == square_box(m)
    assert np.array_equal(bright, m == 255)


def test_rotation_keeps_image_and_mask_aligned() -> None:
    image, mask = painted()
    shift = DomainShift(rotation=30.0, translation=(-0.05, 0.02))
    out, out_mask = shift(image, mask)
    m = np.asarray(out_mask)
    assert set(np.unique(m)) <= {0, 255}
    assert not np.array_equal(m, np.asarray(mask))
    # the square's interior (away from bilinear edges) stays bright, and its centre moved
    # where the mask's centre moved
    bright = np.asarray(out).min(axis=2) > 200
    ys, xs = np.nonzero(m)
    by, bx = np.nonzero(bright)
    assert abs(ys.mean() - by.mean()) < 1.0 and abs(xs.mean() - bx.mean()) < 1.0
    assert (bright & (m == 0)).sum() <= 0.1 * bright.sum()
    # counter-clockwise on screen about the centre (49.5, 39.5), then (-5, +1.6) px
    theta = np.radians(30.0)
    x, y = 45.5 - 49.5, 34.5 - 39.5  # the square's centre relative to the image centre
    ex = 49.5 + x * np.cos(theta) + y * np.sin(theta) - 5.0
    ey = 39.5 - x * np.sin(theta) + y * np.cos(theta) + 1.6
    assert abs(xs.mean() - ex) < 0.5 and abs(ys.mean() - ey) < 0.5

def test_photometric_changes_image_only() -> None:
    image, mask = painted()
    shift = DomainShift(brightness=0.1, contrast=1.1, gains=(1.05, 0.95, 1.0), gamma=0.9,
                        gradient_angle=45.0, gradient_strength=0.2)
    assert shift.is_geometric_identity
    out, out_mask = shift(image, mask)
    assert out_mask is mask
    assert not np.array_equal(np.asarray(out), np.asarray(image))
    assert out.size == image.size and out.mode == "RGB"


def test_gradient_brightens_in_its_direction() -> None:
    flat = Image.new("RGB", (64, 64), (100, 100, 100))
    right, _ = DomainShift(gradient_angle=0.0, gradient_strength=0.2)(flat, None)
    arr = np.asarray(right).astype(int)
    assert arr[:, -1].mean() > arr[:, 0].mean() + 30
    up, _ = DomainShift(gradient_angle=90.0, gradient_strength=0.2)(flat, None)
    arr = np.asarray(up).astype(int)
    assert arr[0].mean() > arr[-1].mean() + 30


def test_sampling_is_deterministic_modest_and_varies_by_factory() -> None:
    a, b = sample_shift(2, seed=5), sample_shift(2, seed=5)
    assert a == b
    assert sample_shift(3, seed=5) != a and sample_shift(2, seed=6) != a
    for k in range(20):
        s = sample_shift(k, seed=0)
        assert abs(s.brightness) <= 0.15 and 0.85 <= s.contrast <= 1.15
        assert all(0.9 <= g <= 1.1 for g in s.gains) and s.gradient_strength <= 0.25
        assert abs(s.rotation) <= 5 and all(abs(t) <= 0.04 for t in s.translation)
    image, mask = painted()
    out1, m1 = a(image, mask)
    out2, m2 = b(image, mask)
    assert np.array_equal(np.asarray(out1), np.asarray(out2))
    assert np.array_equal(np.asarray(m1), np.asarray(m2))
    shifts = shifts_for_factories(3, seed=5)
    assert list(shifts) == ["factory-0", "factory-1", "factory-2"] and shifts["factory-2"] == a


def test_invalid_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="gamma"):
        DomainShift(gamma=0.0)
    with pytest.raises(ConfigError, match="strength"):
        sample_shift(0, seed=0, strength=-1.0)
