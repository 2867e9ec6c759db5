"""Cost vs data size: fit time at 25/50/100% of a category's training images, log-log slope.

    python -m experiments.bench.data_size [--category tire] [--fractions 0.25 0.5 1.0]

Fit = extraction + greedy coreset (ratio from the config). Extraction is linear in the images;
the greedy coreset at a fixed ratio costs N·(ratio·N) distance updates, so its share grows
quadratically: the slope of log(time) against log(images) says which one dominates here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from federated.config import ExperimentConfig  # noqa: E402
from patchcore.config import load_config  # noqa: E402
from patchcore.data.sources import data_root, load_records  # noqa: E402
from patchcore.fitting import loader_for  # noqa: E402
from patchcore.model import PatchCore  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "shared_real.yaml"))
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "mvtec"))
    p.add_argument("--category", default="tire")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    args = p.parse_args()
    config = load_config(args.config, ExperimentConfig, {"data.root": args.root})
    records = load_records(config.data, data_root(config.data, config.seed), args.category)
    train = [r for r in records if r.split == "train"]
    model = PatchCore(config.model, device=config.device, seed=config.seed)
    rows = []
    for fraction in args.fractions:
        subset = train[: max(1, round(fraction * len(train)))]
        t0 = time.perf_counter()
        features = model.extract(loader_for(subset, config), progress=False)
        t1 = time.perf_counter()
        model.subsample(features, progress=False)
        t2 = time.perf_counter()
        rows.append((len(subset), len(features), t1 - t0, t2 - t1, t2 - t0))
        print(f"{len(subset):>4} images {len(features):>7} patches: extract {t1 - t0:6.1f} s, "
              f"coreset {t2 - t1:6.1f} s, fit {t2 - t0:6.1f} s", flush=True)
    n = np.log([r[0] for r in rows])
    for name, col in (("extract", 2), ("coreset", 3), ("fit", 4)):
        slope = np.polyfit(n, np.log([r[col] for r in rows]), 1)[0]
        print(f"log-log slope, {name} time vs images: {slope:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
