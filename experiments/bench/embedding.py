"""Patch embedding cost per image: ours (grouped or dense kernel per layer, by channel count) vs
all-grouped vs all-dense kernels vs the patch route.

    python -m experiments.bench.embedding [--batch 8] [--repeats 5]

Random layer maps shaped like WideResNet-50-2's (layer2 512 x 28², layer3 1024 x 14²) and
EfficientNet-Lite0's (40 x 28², 112 x 14²) at 224 px, channels_last as the extractor returns
them. The dense kernel is the grouped one scattered into (outputs, C, p, p) — what the previous
version convolved with for every layer; `embed_by_convolution` picks grouped where a layer has at
least patchcore.features.GROUPED_MIN_SAVING times more channels than an output reads; the patch
route is patchify + adaptive pooling (the reference). Prints
median ms per image and the max abs difference of each route to the patch route.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import patchcore.features as features  # noqa: E402
from patchcore.features import _dense_kernels, _layer_kernels, embed_by_convolution, embed_by_patches  # noqa: E402

SHAPES = {"wide_resnet50_2": ((512, 28), (1024, 14)), "efficientnet_lite0": ((40, 28), (112, 14))}


def embed_dense(maps: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """The same embedding with dense (outputs, C, p, p) kernels for every layer, whatever C."""
    channels = tuple(m.shape[1] for m in maps)
    kernels = _layer_kernels(channels, patch_size, pretrain_dim, target_dim)
    dense = _dense_kernels(channels, patch_size, pretrain_dim, target_dim)
    b, _, h, w = maps[0].shape
    out = maps[0].new_zeros((b, target_dim, h, w))
    for fmap, (_, _, j0, j1), kernel in zip(maps, kernels, dense):
        y = F.conv2d(fmap, kernel, padding=(patch_size - 1) // 2)
        if tuple(y.shape[-2:]) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        out[:, j0:j1] += y
    return out.flatten(2).transpose(1, 2), (h, w)


def embed_grouped(maps: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                  target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """The same embedding with grouped kernels for every layer, whatever C."""
    saved = features.GROUPED_MIN_SAVING
    features.GROUPED_MIN_SAVING = 0
    try:
        return embed_by_convolution(maps, patch_size, pretrain_dim, target_dim)
    finally:
        features.GROUPED_MIN_SAVING = saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    for name, shapes in SHAPES.items():
        maps = [torch.randn(args.batch, c, s, s).contiguous(memory_format=torch.channels_last) for c, s in shapes]
        results = {}
        with torch.inference_mode():
            for route in (embed_by_convolution, embed_grouped, embed_dense, embed_by_patches):
                route(maps)  # warm-up (and the kernels' cache)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    out, _ = route(maps)
                    times.append(time.perf_counter() - start)
                results[route.__name__] = (1e3 * statistics.median(times) / args.batch, out)
        ref = results["embed_by_patches"][1]
        for route, (ms, out) in results.items():
            print(f"{name:20s} {route:22s} {ms:8.2f} ms/img   "
                  f"max |diff| vs patches {float((out - ref).abs().max()):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
