"""Locally aware patch embeddings, exactly as the official PatchCore implementation builds them.

For each layer map (B, C, h, w):
1. patchify: every position's 3×3 neighbourhood (zero padding, stride 1) -> (B, h·w, C, 3, 3);
2. layers deeper than the first are resized to the first layer's patch grid by bilinear
   interpolation (align_corners=False) of every patch component;
3. each layer's flattened patch (C·9 values, channel-major) is adaptive-average-pooled to
   `pretrain_dim` = 1024 ("MeanMapper");
4. the layers are stacked, flattened (L·1024) and adaptive-average-pooled to `target_dim` = 1024.

Steps 2 and 3 are both linear maps acting on different axes (grid vs. components), so they
commute: we pool first and interpolate the (much smaller) pooled patches, which gives the same
numbers (tests check it against the literal order) with a fraction of the memory.

Faster still, for backbones with few channels (EfficientNet-Lite: 40 and 112): patchify, both
poolings and the grid alignment are all linear, so each layer's share of the final embedding is
one fixed convolution of its map (kernel p×p, zero padding, weights = the product of the two
adaptive-average-pooling matrices) followed by the bilinear resize, and the layers' shares add
up. `embed` takes that route: it never materialises the (B, L, C·p²) patches, and measured 3.6x
faster than the patch route for EfficientNet-Lite0 and 1.5x for WideResNet-50-2 on the CPU; the
numbers equal the patch route's up to float rounding (relative 1e-7; tested).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, patch_size: int = 3, stride: int = 1) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, h, w) -> patches (B, h'·w', C, p, p) and the patch grid (h', w')."""
    pad = (patch_size - 1) // 2
    b, c, h, w = x.shape
    unfolded = F.unfold(x, kernel_size=patch_size, stride=stride, padding=pad)  # (B, C·p·p, L)
    grid = tuple((s + 2 * pad - (patch_size - 1) - 1) // stride + 1 for s in (h, w))
    patches = unfolded.reshape(b, c, patch_size, patch_size, -1).permute(0, 4, 1, 2, 3)
    return patches, grid  # type: ignore[return-value]


def pool_components(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., K) -> (..., dim): adaptive average pooling over the flattened last axis."""
    lead = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), dim).reshape(*lead, dim)


def resize_grid(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, hs·ws, K) -> (B, hd·wd, K): bilinear resize of every component over the patch grid."""
    if src == dst:
        return x
    b, _, k = x.shape
    grid = x.transpose(1, 2).reshape(b * k, 1, *src)  # (B·K, 1, hs, ws)
    grid = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.reshape(b, k, dst[0] * dst[1]).transpose(1, 2)


def embed(
    maps: list[torch.Tensor],
    patch_size: int = 3,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Layer maps, shallowest first -> embeddings (B, h·w, target_dim) on the first map's grid (h, w)."""
    return embed_by_convolution(maps, patch_size, pretrain_dim, target_dim)


def _pool_matrix(k: int, dim: int) -> np.ndarray:
    """(k, dim) float64: adaptive average pooling of k values to dim bins as a matrix
    (bin b averages [floor(b·k/dim), ceil((b+1)·k/dim)), as torch's adaptive pooling)."""
    m = np.zeros((k, dim))
    for b in range(dim):
        start, end = (b * k) // dim, -((-(b + 1) * k) // dim)
        m[start:end, b] = 1.0 / (end - start)
    return m


@lru_cache(maxsize=16)
def _layer_kernels(channels: tuple[int, ...], patch_size: int, pretrain_dim: int,
                   target_dim: int) -> tuple[tuple[torch.Tensor, int, int], ...]:
    """Per layer: (weight (j1-j0, C, p, p) float32, j0, j1): its contribution to output bins [j0, j1)."""
    final = _pool_matrix(len(channels) * pretrain_dim, target_dim)  # (L·pre, target)
    kernels = []
    for i, c in enumerate(channels):
        block = _pool_matrix(c * patch_size**2, pretrain_dim) @ final[i * pretrain_dim:(i + 1) * pretrain_dim]
        used = np.flatnonzero(np.abs(block).sum(axis=0))  # output bins this layer reaches
        j0, j1 = int(used.min()), int(used.max()) + 1
        weight = torch.from_numpy(block[:, j0:j1].T.copy()).float()  # (j1-j0, C·p·p), channel-major
        kernels.append((weight.reshape(j1 - j0, c, patch_size, patch_size), j0, j1))
    return tuple(kernels)


def embed_by_convolution(maps: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                         target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """`embed` as one convolution per layer + bilinear alignment (see the module docstring)."""
    kernels = _layer_kernels(tuple(m.shape[1] for m in maps), patch_size, pretrain_dim, target_dim)
    b, _, h, w = maps[0].shape
    out = maps[0].new_zeros((b, target_dim, h, w))  # (B, target, h, w)
    pad = (patch_size - 1) // 2
    for fmap, (weight, j0, j1) in zip(maps, kernels):
        y = F.conv2d(fmap, weight.to(fmap.device, fmap.dtype), padding=pad)  # (B, j1-j0, h_l, w_l)
        if tuple(y.shape[-2:]) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        out[:, j0:j1] += y
    return out.flatten(2).transpose(1, 2), (h, w)  # (B, h·w, target)


def embed_by_patches(maps: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                     target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """`embed` through explicit patches: patchify, pool, align, aggregate (the reference)."""
    pooled, grids = [], []
    for fmap in maps:
        patches, grid = patchify(fmap, patch_size)  # (B, L, C, p, p)
        pooled.append(pool_components(patches.flatten(2), pretrain_dim))  # (B, L, pretrain_dim)
        grids.append(grid)
    ref = grids[0]
    aligned = [resize_grid(p, g, ref) for p, g in zip(pooled, grids)]  # each (B, h·w, pretrain_dim)
    stacked = torch.stack(aligned, dim=2)  # (B, h·w, L, pretrain_dim)
    return pool_components(stacked.flatten(2), target_dim), ref
