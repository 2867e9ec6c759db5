"""Extraction speed side by side: fp32 vs channels_last vs bf16 (CPU) / fp16 (CUDA) autocast,
backbone forward alone vs extraction (forward + locally aware patch embedding).

    python -m experiments.bench.extraction [--root ../shared/data/mvtec] [--category tire]
        [--backbone efficientnet_lite0] [--images 64] [--batch-size 16] [--repeats 5]

Images are decoded and preprocessed once up front, so only compute is timed. Every repeat runs
every variant in turn (interleaved, so a busy neighbour slows all of them alike); the table shows
medians, img/s, the ratio to fp32 and the relative difference of the embeddings to fp32's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import patchcore.backbones as backbones  # noqa: E402
from patchcore.config import BackboneConfig, DataConfig, ModelConfig  # noqa: E402
from patchcore.data import ImageDataset, make_loader  # noqa: E402
from patchcore.data.sources import load_records, model_preprocess  # noqa: E402
from patchcore.features import embed_by_convolution, embed_by_patches  # noqa: E402
from patchcore.model import PatchCore  # noqa: E402


def variants(device: torch.device) -> dict[str, tuple[str, bool]]:
    reduced = "float16" if device.type == "cuda" else "bfloat16"
    short = "fp16" if reduced == "float16" else "bf16"
    return {"fp32": ("float32", False), "fp32+channels_last": ("float32", True),
            short: (reduced, False), f"{short}+channels_last": (reduced, True)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "mvtec"))
    p.add_argument("--category", default="tire")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    data = DataConfig(format="mvtec", root=args.root)
    train = [r for r in load_records(data, Path(args.root), args.category) if r.split == "train"][: args.images]
    batches = [b["image"] for b in make_loader(ImageDataset(train, model_preprocess(data)), args.batch_size)]
    n = sum(len(b) for b in batches)
    models = {}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
    for name, (precision, nhwc) in variants(device).items():
        config = ModelConfig(backbone=BackboneConfig(args.backbone, ("layer2", "layer3"), args.weights),
                             precision=precision)
        backbones.CHANNELS_LAST = nhwc  # the extractor's memory format (default: True)
        models[name] = PatchCore(config, device=args.device)

    def forward(model: PatchCore) -> None:
        with torch.inference_mode():
            for b in batches:
                model.extractor(b.to(model.device))
        _sync(model.device)

    def extract(model: PatchCore) -> torch.Tensor:
        out = model.extract(batches, progress=False)
        _sync(model.device)
        return out

    reference = None
    diffs = {}
    for name, model in models.items():  # warm-up + feature differences
        feats = extract(model)
        reference = feats if reference is None else reference
        diffs[name] = float((feats - reference).norm() / reference.norm())
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            for stage, fn in (("forward", forward), ("extract", extract)):
                start = time.perf_counter()
                fn(model)
                times.setdefault((name, stage), []).append(time.perf_counter() - start)
    with torch.inference_mode():  # the embedding alone, both routes, on the fp32 maps
        maps = [list(models["fp32"].extractor(b.to(models["fp32"].device)).values()) for b in batches]
        for _ in range(args.repeats):
            for route in (embed_by_patches, embed_by_convolution):
                start = time.perf_counter()
                for m in maps:
                    route(m)
                _sync(models["fp32"].device)
                times.setdefault((route.__name__, "embed"), []).append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    first = next(iter(models))
    print(f"device {models[first].device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.backbone} ({args.weights}), {n} {args.category} images, batch {args.batch_size}, "
          f"medians of {args.repeats} interleaved repeats")
    print(f"{'variant':<22}{'forward img/s':>14}{'x fp32':>8}{'extract img/s':>15}{'x fp32':>8}"
          f"{'extract/forward':>17}{'rel. diff':>11}")
    for name in models:
        f, e = med[(name, "forward")], med[(name, "extract")]
        print(f"{name:<22}{n / f:>14.1f}{med[(first, 'forward')] / f:>8.2f}{n / e:>15.1f}"
              f"{med[(first, 'extract')] / e:>8.2f}{e / f:>17.2f}{diffs[name]:>11.2e}")
    p, c = med[("embed_by_patches", "embed")], med[("embed_by_convolution", "embed")]
    print(f"patch embedding alone (fp32 maps): patch route {p / n * 1e3:.1f} ms/img, convolution route "
          f"{c / n * 1e3:.1f} ms/img ({p / c:.2f}x faster); "
          f"fp32 forward {med[(first, 'forward')] / n * 1e3:.1f} ms/img")
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
