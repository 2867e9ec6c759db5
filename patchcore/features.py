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
up. `embed` takes that route: it never materialises the (B, L, C·p²) patches, and on the idle
2-core CPU it measured 6x faster than the patch route for EfficientNet-Lite0 (2.1 vs 12.7 ms/img)
and 23x for WideResNet-50-2 (1.8 vs 42 ms/img, with the grouped kernels below); the numbers equal
the patch route's up to float rounding (relative 1e-7; tested).

Each output bin averages a contiguous run of the channel-major C·p² values, so it reads very few
channels: for WideResNet-50-2 (512 and 1024 channels, 1024 bins, then pairs of bins) exactly
one channel of layer2 and two of layer3 per output. A dense (outputs, C, p, p) kernel would spend
C/g = 512 times the necessary multiply-adds on zeros. So each layer's kernel is built as a grouped
convolution: every output row gets the g channels it reads (g = the most any row reads, padded
with zero weights), the map's channels are gathered in that order once, and
`conv2d(..., groups=outputs)` does g·p² multiply-adds per output and position. A layer uses it
when C >= GROUPED_MIN_SAVING · g; with few channels (EfficientNet-Lite: C/g = 20-56) the dense
kernel is faster on the CPU and is used instead. Same numbers either way up to float rounding
(tested); `python -m experiments.bench.embedding` measures both.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from patchcore.config import LAYER_WEIGHTINGS


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


WEIGHTINGS = tuple(w for w in LAYER_WEIGHTINGS if w != "auto")  # the config's list: paper, concat, balanced


def embed(
    maps: list[torch.Tensor],
    patch_size: int = 3,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
    weighting: str = "paper",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Layer maps, shallowest first -> embeddings (B, h·w, D) on the first map's grid (h, w).

    weighting "paper": D = target_dim, the official PatchCore embedding (this module's docstring).
    "concat" / "balanced": D = the layers' channels summed, `embed_concat` (anomalib's embedding,
    and the same with every layer's share normalised)."""
    if weighting == "paper":
        return embed_by_convolution(maps, patch_size, pretrain_dim, target_dim)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown layer weighting {weighting!r}; one of {', '.join(WEIGHTINGS)}")
    return embed_concat(maps, patch_size, balanced=weighting == "balanced")


def embed_concat(maps: list[torch.Tensor], patch_size: int = 3,
                 balanced: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Each layer's p×p neighbourhood mean (zero padding counted, as AvgPool2d(p, 1, p//2)),
    deeper layers bilinearly resized to the first layer's grid, channels concatenated: anomalib's
    PatchCore embedding. `balanced` scales each layer by 1/sqrt(its channels), so every layer
    weighs the same in a squared distance whatever its width.

    Why it exists: the paper's per-layer adaptive pooling to 1024 values *up-samples* a narrow
    layer (EfficientNet-Lite0: 40·9 = 360 and 112·9 = 1008 values) and then gives every layer
    half of the final bins, so one stride-8 channel of Lite0 weighs ~2.8x a stride-16 one in
    the distance. With WideResNet-50-2 (512 and 1024 channels) the pooling down-samples and the
    paper's embedding stays the default (experiments/studies/layer_weighting.md measures both)."""
    b, _, h, w = maps[0].shape
    pad = (patch_size - 1) // 2
    parts = []
    for fmap in maps:
        y = F.avg_pool2d(fmap, patch_size, stride=1, padding=pad, count_include_pad=True) if patch_size > 1 else fmap
        if tuple(y.shape[-2:]) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(y / fmap.shape[1] ** 0.5 if balanced else y)
    out = torch.cat(parts, dim=1)  # (B, ΣC, h, w)
    return out.flatten(2).transpose(1, 2).contiguous(), (h, w)


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
                   target_dim: int) -> tuple[tuple[torch.Tensor, torch.Tensor, int, int], ...]:
    """Per layer: (weight (j1-j0, g, p, p) float32, channel index (j1-j0, g) long, j0, j1): its
    contribution to output bins [j0, j1) as a grouped convolution over the gathered channels."""
    final = _pool_matrix(len(channels) * pretrain_dim, target_dim)  # (L·pre, target)
    kernels = []
    for i, c in enumerate(channels):
        block = _pool_matrix(c * patch_size**2, pretrain_dim) @ final[i * pretrain_dim:(i + 1) * pretrain_dim]
        used = np.flatnonzero(np.abs(block).sum(axis=0))  # output bins this layer reaches
        j0, j1 = int(used.min()), int(used.max()) + 1
        dense = block[:, j0:j1].T.reshape(j1 - j0, c, patch_size * patch_size)  # (rows, C, p²), channel-major
        reads = [np.flatnonzero(np.abs(row).sum(axis=1)) for row in dense]  # channels each row reads
        g = max(1, max(len(r) for r in reads))
        index = np.zeros((j1 - j0, g), dtype=np.int64)
        weight = np.zeros((j1 - j0, g, patch_size * patch_size))
        for row, chans in enumerate(reads):
            chans = chans if len(chans) else np.zeros(1, dtype=np.int64)  # a row reading nothing: zero weight
            index[row, : len(chans)] = chans
            index[row, len(chans):] = chans[0]  # padding: any channel, with zero weight
            weight[row, : len(chans)] = dense[row, chans]
        kernels.append((torch.from_numpy(weight).float().reshape(j1 - j0, g, patch_size, patch_size),
                        torch.from_numpy(index), j0, j1))
    return tuple(kernels)


# A layer uses the grouped kernel when it saves at least this factor of multiply-adds (C / g).
# Measured on the 2-core CPU (batch 8, channels_last): grouped wins 5-15x at C/g = 256-512
# (WideResNet-50-2: 512 and 1024 channels), ~1.2x at 128, loses 1.1-4.6x at C/g = 20-64
# (EfficientNet-Lite0: 40 and 112 channels), where oneDNN's dense convolution is very efficient.
GROUPED_MIN_SAVING = 128


@lru_cache(maxsize=16)
def _dense_kernels(channels: tuple[int, ...], patch_size: int, pretrain_dim: int,
                   target_dim: int) -> tuple[torch.Tensor, ...]:
    """Per layer: the grouped kernel scattered back into a dense (rows, C, p, p) one."""
    dense = []
    for c, (weight, index, _, _) in zip(channels, _layer_kernels(channels, patch_size, pretrain_dim, target_dim)):
        rows, _, p, q = weight.shape
        full = torch.zeros(rows, c, p, q, dtype=weight.dtype)
        dense.append(full.scatter_add_(1, index[:, :, None, None].expand(-1, -1, p, q), weight))
    return tuple(dense)


@lru_cache(maxsize=16)
def _gathers(channels: tuple[int, ...], patch_size: int, pretrain_dim: int,
             target_dim: int) -> tuple[torch.Tensor | None, ...]:
    """Per layer: the flat channel order a grouped kernel reads, or None when it is the map's own
    order (both WideResNet-50-2 layers), so the gather can be skipped."""
    out = []
    for c, (_, index, _, _) in zip(channels, _layer_kernels(channels, patch_size, pretrain_dim, target_dim)):
        flat = index.flatten()
        out.append(None if len(flat) == c and torch.equal(flat, torch.arange(c)) else flat)
    return tuple(out)


def embed_by_convolution(maps: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                         target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """`embed` as one convolution per layer (grouped or dense) + bilinear alignment (see the module docstring)."""
    channels = tuple(m.shape[1] for m in maps)
    kernels = _layer_kernels(channels, patch_size, pretrain_dim, target_dim)
    b, _, h, w = maps[0].shape
    # (B, target, h, w) as a channels_last view of (B, h, w, target): the convolutions' channels_last
    # outputs add into it without a layout change, and the (B, h·w, target) result is contiguous.
    out = maps[0].new_zeros((b, h, w, target_dim)).permute(0, 3, 1, 2)
    pad = (patch_size - 1) // 2
    for i, (fmap, (weight, index, j0, j1)) in enumerate(zip(maps, kernels)):
        if fmap.shape[1] >= GROUPED_MIN_SAVING * index.shape[1]:  # grouped: rows·g·p² MACs per position
            gather = _gathers(channels, patch_size, pretrain_dim, target_dim)[i]
            gathered = fmap if gather is None else fmap.index_select(1, gather.to(fmap.device))  # (B, rows·g, h_l, w_l)
            y = F.conv2d(gathered, weight.to(fmap.device, fmap.dtype), padding=pad, groups=index.shape[0])
        else:  # few channels: one dense (rows, C, p, p) kernel runs faster than many tiny groups
            dense = _dense_kernels(channels, patch_size, pretrain_dim, target_dim)[i]  # (rows, C, p, p)
            y = F.conv2d(fmap, dense.to(fmap.device, fmap.dtype), padding=pad)
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
