"""Federation wall time vs centralized fit on the same data (configs/shared_real.yaml).

    python -m experiments.bench.federation_vs_central [--config configs/shared_real.yaml]
        [--category tire] [--factories 4] [--out results/bench-fed-vs-central]

Centralized: one process, one backbone, `fit_category` on the union of all training images and
scoring of all test images, per category. Federated: `run_federation` (Flower + Ray: Ray start,
one backbone per client actor, every factory's extraction + local coreset, aggregation, and the
evaluate round scoring every factory's test images, i.e. all test images once). Both do the same
work on the same images; the ratio federated / centralized is the federation's overhead (target
<= 1.3x). Runs centralized, federated, centralized again and uses the mean of the two
centralized runs, so a neighbour's load drifting over the run biases neither side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from experiments.app.simulation import run_federation  # noqa: E402
from federated.config import ExperimentConfig  # noqa: E402
from patchcore.config import load_config  # noqa: E402
from patchcore.data.sources import data_root, load_records  # noqa: E402
from patchcore.fitting import fit_category, score_records  # noqa: E402
from patchcore.model import PatchCore  # noqa: E402


def centralized(config: ExperimentConfig) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    model = PatchCore(config.model, device=config.device, seed=config.seed)
    auroc = {}
    for category in config.data.categories:
        records = load_records(config.data, data_root(config.data, config.seed), category)
        model, _ = fit_category(config, category, records, progress=False, model=model)
        scored = score_records(model, [r for r in records if r.split == "test"], config, progress=False)
        auroc[category] = float(scored.metrics()["image_auroc"])
    return time.perf_counter() - start, auroc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "shared_real.yaml"))
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "mvtec"))
    p.add_argument("--category", action="append", default=None)
    p.add_argument("--factories", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    overrides = {"data.root": args.root, "federation.num_factories": args.factories}
    if args.category:
        overrides["data.categories"] = args.category
    config = load_config(args.config, ExperimentConfig, overrides)
    out = args.out or tempfile.mkdtemp(prefix="fedpatch-bench-fed-")

    central_a, auroc = centralized(config)
    print(f"centralized (1st): {central_a:.1f} s  image AUROC {auroc}", flush=True)
    start = time.perf_counter()
    report = run_federation(args.config, overrides, out)
    fed_s = time.perf_counter() - start
    print(f"federated:         {fed_s:.1f} s", flush=True)
    central_b, _ = centralized(config)
    print(f"centralized (2nd): {central_b:.1f} s", flush=True)
    central = (central_a + central_b) / 2
    phases: dict[str, float] = {}
    for entry in report.get("factories", {}).values():
        for key, value in (entry.get("seconds") or {}).items():
            if key.endswith("_s") and isinstance(value, (int, float)):
                phases[key] = phases.get(key, 0.0) + float(value)
    print(f"categories {list(config.data.categories)}, {args.factories} factories, "
          f"client_cpus {config.federation.client_cpus}")
    print(f"federated / centralized wall time: {fed_s / central:.2f}x ({fed_s:.1f} s vs {central:.1f} s, "
          f"centralized runs {central_a:.1f} / {central_b:.1f} s)")
    if phases:
        print("summed over factories: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
