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
"""

from __future__ import annotations

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
    pooled, grids = [], []
    for fmap in maps:
        patches, grid = patchify(fmap, patch_size)  # (B, L, C, p, p)
        pooled.append(pool_components(patches.flatten(2), pretrain_dim))  # (B, L, pretrain_dim)
        grids.append(grid)
    ref = grids[0]
    aligned = [resize_grid(p, g, ref) for p, g in zip(pooled, grids)]  # each (B, h·w, pretrain_dim)
    stacked = torch.stack(aligned, dim=2)  # (B, h·w, L, pretrain_dim)
    return pool_components(stacked.flatten(2), target_dim), ref
