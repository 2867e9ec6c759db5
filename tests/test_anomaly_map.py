"""Anomaly maps: the torch Gaussian equals scipy's gaussian_filter; upsampling geometry."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from patchcore.anomaly_map import gaussian_blur, to_pixel_maps


@pytest.mark.parametrize("shape", [(2, 30, 20), (1, 7, 9), (1, 224, 224)])
def test_gaussian_blur_equals_scipy_reflect(shape):
    x = torch.rand(*shape, dtype=torch.float64)
    ref = np.stack([gaussian_filter(a, sigma=4) for a in x.numpy()])
    assert np.abs(gaussian_blur(x, 4.0).numpy() - ref).max() < 1e-12


def test_pixel_maps_peak_where_the_patch_is():
    patch = torch.zeros(1, 28, 28)
    patch[0, 5, 20] = 1.0
    maps = to_pixel_maps(patch, (224, 224), sigma=4.0)
    assert maps.shape == (1, 224, 224)
    y, x = divmod(int(maps[0].argmax()), 224)
    assert abs(y - (5 * 8 + 3.5)) <= 4 and abs(x - (20 * 8 + 3.5)) <= 4


def test_sigma_zero_is_plain_bilinear():
    patch = torch.rand(1, 4, 4)
    up = to_pixel_maps(patch, (8, 8), sigma=0.0)
    ref = torch.nn.functional.interpolate(patch[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(up, ref)
