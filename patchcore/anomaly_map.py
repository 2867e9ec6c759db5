"""Patch scores -> pixel anomaly maps: bilinear upsampling, then Gaussian smoothing (σ = 4).

As the official RescaleSegmentor: F.interpolate(bilinear, align_corners=False) to the input
crop, then scipy.ndimage.gaussian_filter(sigma=4) — here in torch (separable kernel radius
int(4σ + 0.5), scipy's "reflect" boundary: edge samples repeated), so it runs on the scores'
device. Tests check it against scipy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """1-D normalised kernel (2r+1,) with r = int(truncate·σ + 0.5), as scipy builds it."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _reflect_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """scipy 'reflect' (d c b a | a b c d | d c b a), tiled for pads longer than the axis."""
    n = x.shape[dim]
    idx = torch.arange(-r, n + r, device=x.device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    idx = torch.where(idx >= n, period - 1 - idx, idx)
    return x.index_select(dim, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) Gaussian-smoothed like scipy.ndimage.gaussian_filter(mode='reflect')."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(device=maps.device, dtype=maps.dtype)
    r = (len(kernel) - 1) // 2
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    x = F.conv2d(_reflect_pad(x, r, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(_reflect_pad(x, r, 2), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def to_pixel_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """patch scores (B, h, w) -> smoothed pixel maps (B, H, W) at `size` = (H, W)."""
    up = F.interpolate(patch_scores.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)
