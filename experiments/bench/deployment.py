"""Wall time of a real 3-site loopback deployment vs the Ray simulation of the same images.

    python -m experiments.bench.deployment --config configs/shared_real.yaml --out /tmp/bench-deploy

Three site folders are made under OUT/sites from the config's data root by symbolic links (no
image is copied): the categories' training and test images dealt round-robin to plant-a and
plant-b and plant-c, except that plant-c gets none of the last category (one site lacks it).
Then, on those folders: `fedpatch deploy` (TLS SuperLink with node authentication, 3 SuperNodes,
`flwr run`), and the Ray simulation (`run_federation`) of the same config partitioned into 3
factories over the same root (the same images, split by the simulation's own partition). Prints
wall time per phase and per-site backbone loads, and writes OUT/deployment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from experiments.app.deploy import Deployment, SiteSpec, check_sites
from experiments.app.simulation import run_federation
from federated.config import ExperimentConfig
from patchcore.config import load_config
from patchcore.data.sources import categories, data_root, load_records

NAMES = ("plant-a", "plant-b", "plant-c")


def link(src: Path, root: Path, dest_root: Path) -> None:
    dest = dest_root / src.resolve().relative_to(root.resolve())
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.symlink(src.resolve(), dest)


def make_site_folders(config: ExperimentConfig, out: Path) -> dict[str, Path]:
    """Three MVTec-layout folders of symbolic links into the config's data root."""
    root = data_root(config.data, config.seed)
    names = categories(config.data, root)
    folders = {n: out / n for n in NAMES}
    for c, category in enumerate(names):
        sites = NAMES if c < len(names) - 1 else NAMES[:2]  # plant-c lacks the last category
        for i, record in enumerate(sorted(load_records(config.data, root, category), key=lambda r: str(r.path))):
            target = folders[sites[i % len(sites)]]
            link(Path(record.path), root, target)
            for mask in record.mask_paths:
                link(Path(mask), root, target)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shared_real.yaml")
    parser.add_argument("--out", required=True, help="a new folder")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config_path = Path(args.config).resolve()
    overrides = {"federation.num_factories": 3}
    config = load_config(config_path, ExperimentConfig, overrides)
    folders = make_site_folders(config, out / "sites")
    specs = [SiteSpec(n, p) for n, p in folders.items()]
    deploy_overrides = {**overrides, "data.root": ""}  # the server gets no data root
    counts = check_sites(load_config(config_path, ExperimentConfig, deploy_overrides), specs)
    print("sites:", json.dumps(counts))

    deployment = Deployment(config_path, specs, out / "deploy-run", deploy_overrides)
    start = time.perf_counter()
    try:
        deployment.start()
        deployed = deployment.run()
    finally:
        deployment.stop()
    deploy_s = time.perf_counter() - start

    start = time.perf_counter()
    simulated = run_federation(config_path, overrides, out / "simulation-run")
    simulation_s = time.perf_counter() - start

    result = {
        "sites": counts,
        "deployment": {"wall_s": deploy_s, **deployment.timings, "rounds_s": deployed["seconds"],
                       "per_site_s": {n: f["seconds"] for n, f in deployed["factories"].items()},
                       "aggregation": deployed["aggregation"]},
        "simulation": {"wall_s": simulation_s, "rounds_s": simulated["seconds"],
                       "per_site_s": {n: f["seconds"] for n, f in simulated["factories"].items()}},
    }
    (out / "deployment.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"deployment (start + run + stop): {deploy_s:.1f} s  (processes up {deployment.timings['start_s']:.1f} s,"
          f" run {deployment.timings['run_s']:.1f} s)")
    print(f"simulation (Ray, same images):   {simulation_s:.1f} s")
    for label, report in (("deployment", deployed), ("simulation", simulated)):
        print(label, {k: round(v, 1) for k, v in report["seconds"].items()})
        for name, f in sorted(report["factories"].items()):
            s = f["seconds"]
            print(f"  {name}: train images {f['num_images']}, backbone load train {s.get('backbone_load_s', 0):.2f} s "
                  f"/ evaluate {s.get('evaluate_backbone_load_s', 0):.2f} s, extract {s.get('extract_s', 0):.1f} s, "
                  f"coreset {s.get('coreset_s', 0):.1f} s")


if __name__ == "__main__":
    main()
