"""AUROC effect of the extraction options on the shared real images (tire, hazelnut).

    python -m experiments.bench.precision_auroc [--config configs/shared_real.yaml]
        [--variants fp32 channels_last bf16 bf16+channels_last] [--category tire ...]

Fits and scores each category once per variant (same config, seed and images; only the
backbone's precision / memory format differs) and prints image and pixel AUROC with their
difference to fp32. The rule: an option may become default only if it moves AUROC by less than
0.0005 (0.05 point).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

import patchcore.backbones as backbones  # noqa: E402
import patchcore.model  # noqa: E402
from federated.config import ExperimentConfig  # noqa: E402
from patchcore.config import Config, load_config  # noqa: E402
from patchcore.data.sources import data_root, load_records  # noqa: E402
from patchcore.features import embed, embed_by_convolution, embed_by_patches  # noqa: E402
from patchcore.fitting import fit_category, score_records  # noqa: E402

VARIANTS = {"fp32": ("float32", False), "channels_last": ("float32", True), "fp32-patch-route": ("float32", False),
            "bf16": ("bfloat16", False), "bf16+channels_last": ("bfloat16", True),
            "fp16": ("float16", False)}


def run_variant(config: Config, name: str, categories: list[str]) -> dict[str, dict[str, float]]:
    precision, nhwc = VARIANTS[name]
    config = config.model_copy(update={"model": config.model.model_copy(update={"precision": precision})})
    backbones.CHANNELS_LAST = nhwc  # the extractor's default memory format
    # the reference patch-by-patch embedding instead of the default convolution route (the paper's
    # weighting; other weightings keep their own embedding)
    route = embed_by_patches if name == "fp32-patch-route" else embed_by_convolution
    patchcore.model.embed = lambda maps, p, pre, target, weighting: (
        route(maps, p, pre, target) if weighting == "paper" else embed(maps, p, pre, target, weighting))
    out = {}
    for category in categories:
        records = load_records(config.data, data_root(config.data, config.seed), category)
        start = time.perf_counter()
        model, _ = fit_category(config, category, records, progress=False)
        fit_s = time.perf_counter() - start
        scored = score_records(model, [r for r in records if r.split == "test"], config, progress=False)
        m = scored.metrics()
        out[category] = {"image_auroc": float(m["image_auroc"]), "pixel_auroc": float(m["pixel_auroc"]),
                         "fit_s": fit_s, "total_s": time.perf_counter() - start}
        print(f"{name:<20} {category:<10} image {m['image_auroc']:.4f} pixel {m['pixel_auroc']:.4f} "
              f"fit {fit_s:.1f} s", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "shared_real.yaml"))
    p.add_argument("--variants", nargs="+", default=["fp32", "fp32-patch-route", "bf16", "channels_last"],
                   choices=sorted(VARIANTS))
    p.add_argument("--category", action="append", default=None)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "mvtec"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.coreset.ratio=0.01 (a cheaper proxy on a busy machine)")
    args = p.parse_args()
    overrides = {"data.root": args.root}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    config = load_config(args.config, ExperimentConfig, overrides)
    categories = args.category or list(config.data.categories)
    results = {name: run_variant(config, name, categories) for name in args.variants}
    base = results[args.variants[0]]
    print(f"\n{'variant':<20}{'category':<10}{'image AUROC':>12}{'Δ image':>10}{'pixel AUROC':>13}{'Δ pixel':>10}")
    for name, per in results.items():
        for category, m in per.items():
            print(f"{name:<20}{category:<10}"
                  f"{m['image_auroc']:>12.4f}{m['image_auroc'] - base[category]['image_auroc']:>+10.4f}"
                  f"{m['pixel_auroc']:>13.4f}{m['pixel_auroc'] - base[category]['pixel_auroc']:>+10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
