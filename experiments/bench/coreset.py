"""Greedy k-center coreset: ours (fp32, bf16) against anomalib's KCenterGreedy on the same features.

    python -m experiments.bench.coreset [--features /tmp/fedpatch-bench/tire_train.npy]
        [--ratio 0.1] [--limit N] [--seeds 0 1 2] [--variants 128:float32:off 256:float32 256:float32:off]
        [--anomalib-python /tmp/anomalib-venv/bin/python] [--threads N]

The features are real EfficientNet-Lite0 patch embeddings of the shared tire training images
(configs/shared_real.yaml, category tire, ~164k x 1024), extracted once with
`PatchCore(config.model).extract(loader_for(records, config))` and cached as .npy. anomalib is
not a dependency of fedpatch: its sampler runs in a subprocess of another interpreter (its own
venv) on the same .npy file and returns its picks; every coverage radius (max over all points of
the distance to the nearest pick) is computed here, in the original space, by one function.
Every method runs once per seed (ours: projection matrix and starting points; anomalib: its
sparse projection via numpy's global seed and its random first pick via torch's); the table
gives, per method, the median seconds and the median radius over the seeds, and the ratios of
those medians to anomalib's. A greedy k-center radius is the max of N distances: it moves by a
few percent from one seed to the next, so one seed cannot settle a 1% question.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(tempfile.gettempdir()) / "fedpatch-bench"
CONFIG = REPO / "configs" / "shared_real.yaml"
DATA_ROOT = REPO.parent / "shared" / "data" / "mvtec"  # read in place, beside the repo

# Run by the anomalib interpreter: KCenterGreedy on the .npy, picks written as .npy.
ANOMALIB_SCRIPT = r"""
import sys, time, json, numpy as np, torch
from anomalib.models.components.sampling import KCenterGreedy
feats = torch.from_numpy(np.load(sys.argv[1])).float()
np.random.seed(int(sys.argv[4]))  # its SparseRandomProjection draws from numpy's global state
torch.manual_seed(int(sys.argv[4]))  # its first pick
if len(sys.argv) > 5 and int(sys.argv[5]) > 0:
    torch.set_num_threads(int(sys.argv[5]))
sampler = KCenterGreedy(embedding=feats, sampling_ratio=float(sys.argv[2]))
start = time.perf_counter()
idx = sampler.select_coreset_idxs()
seconds = time.perf_counter() - start
np.save(sys.argv[3], np.asarray(idx, dtype=np.int64))
import anomalib
print(json.dumps({"seconds": seconds, "picks": len(idx), "version": anomalib.__version__,
                  "torch": torch.__version__}))
"""


def tire_embeddings(split: str, cache: Path = CACHE, device: str = "auto") -> Path:
    """Cache (and return the path of) the tire patch embeddings of one split as float32 .npy.

    For the test split also caches `_labels.npy` (N,), `_masks.npy` (N, H, W) uint8 and
    `_grid.json` so that scores can be turned back into image and pixel metrics."""
    path = cache / f"tire_{split}.npy"
    if path.is_file():
        return path
    from federated.config import ExperimentConfig
    from patchcore.config import load_config
    from patchcore.data.sources import load_records
    from patchcore.evaluation import loader_for
    from patchcore.model import PatchCore

    config = load_config(CONFIG, ExperimentConfig, {"data.root": str(DATA_ROOT), "data.categories": ["tire"]})
    records = [r for r in load_records(config.data, DATA_ROOT, "tire") if r.split == split]
    model = PatchCore(config.model, device=device, seed=config.seed)
    cache.mkdir(parents=True, exist_ok=True)
    if split == "train":
        feats = model.extract(loader_for(records, config), desc=f"tire {split}")  # (N·h·w, D)
    else:
        chunks, masks = [], []
        for batch in loader_for(records, config):
            emb, grid = model.embed(batch["image"])  # (B, h·w, D)
            chunks.append(emb.flatten(0, 1).cpu())
            masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
        feats = torch.cat(chunks)
        np.save(cache / f"tire_{split}_labels.npy", np.array([r.label for r in records], dtype=np.int64))
        np.save(cache / f"tire_{split}_masks.npy", np.concatenate(masks))
        (cache / f"tire_{split}_grid.json").write_text(json.dumps({"grid": list(grid), "images": len(records)}))
    np.save(path, feats.cpu().numpy().astype(np.float32))
    return path


def radius(features: torch.Tensor, picks: torch.Tensor) -> float:
    """Coverage radius in the original space: the one function used for every method."""
    from patchcore.coreset import coverage_radius

    return coverage_radius(features[picks], features)


def run_ours(features: torch.Tensor, size: int, **kwargs) -> dict:
    from patchcore.coreset import greedy_coreset

    start = time.perf_counter()
    picks = greedy_coreset(features, size, **kwargs)
    return {"seconds": time.perf_counter() - start, "picks": picks}


def run_anomalib(python: str, npy: Path, ratio: float, seed: int, threads: int | None) -> dict:
    out = npy.with_name(npy.stem + f"_anomalib_picks_{seed}.npy")
    cmd = [python, "-c", ANOMALIB_SCRIPT, str(npy), str(ratio), str(out), str(seed), str(threads or 0)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"anomalib subprocess failed:\n{result.stderr[-3000:]}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    info["picks"] = torch.from_numpy(np.load(out))
    return info


def parse_variant(text: str) -> tuple[int | None, str, str]:
    """'128:float32' -> (128, 'float32', 'auto'); 'none:float32:off' -> no projection, plain loop.
    The third field is the pruning setting (auto: the pruned loop on CPU in float32)."""
    dim, precision, pruning = (text.split(":") + ["", ""])[:3]
    return (None if dim == "none" else int(dim)), (precision or "float32"), (pruning or "auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=None, help="(N, D) float32 .npy; default: tire train cache")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=None, help="first N rows of a seeded shuffle")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["128:float32", "128:float32:off", "256:float32",
                                                          "256:float32:off"],
                        help="ours, as PROJECTION_DIM:PRECISION[:PRUNING] (128:float32 is the paper default; "
                             "PRUNING auto|on|off, off = the plain loop)")
    parser.add_argument("--num-starts", type=int, default=10)
    parser.add_argument("--anomalib-python", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every method (default: torch's, all cores)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    npy = args.features or tire_embeddings("train")
    feats = np.load(npy)
    if args.limit and args.limit < len(feats):
        npy = CACHE / f"{Path(npy).stem}_{args.limit}.npy"
        if npy.is_file():
            feats = np.load(npy)
        else:
            keep = np.random.default_rng(0).permutation(len(feats))[: args.limit]
            feats = feats[np.sort(keep)]
            np.save(npy, feats)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    x = torch.from_numpy(feats).to(device)
    from patchcore.coreset import coreset_size

    size = coreset_size(len(x), args.ratio)
    print(f"features {tuple(x.shape)} from {npy}, {size} picks, device {device}, threads {torch.get_num_threads()}, "
          f"seeds {args.seeds}", flush=True)
    runs: dict[str, list[dict]] = {}
    same: dict[str, list[bool]] = {}  # pruned vs plain picks, per projection/precision and seed
    for seed in args.seeds:  # seed by seed, every method in turn: a busy neighbour slows all alike
        picks: dict[tuple, torch.Tensor] = {}
        for variant in args.variants:
            dim, precision, pruning = parse_variant(variant)
            name = f"ours p{dim} {precision}" + (" plain" if pruning == "off" else "")
            row = run_ours(x, size, projection_dim=dim, num_starts=args.num_starts, seed=seed, precision=precision,
                           pruning=pruning)
            row["radius"] = radius(x, row["picks"].to(x.device))
            runs.setdefault(name, []).append(row)
            print(f"  seed {seed} {name}: {row['seconds']:.2f} s, radius {row['radius']:.4f}", flush=True)
            key = (dim, precision)
            if key in picks:
                same.setdefault(f"p{dim} {precision}", []).append(bool(torch.equal(picks[key], row["picks"])))
            picks[key] = row["picks"]
        if args.anomalib_python:
            row = run_anomalib(args.anomalib_python, Path(npy), args.ratio, seed, args.threads)
            row["radius"] = radius(x, row["picks"].to(x.device))
            runs.setdefault("anomalib KCenterGreedy", []).append(row)
            print(f"  seed {seed} anomalib {row['version']}: {row['seconds']:.2f} s, radius {row['radius']:.4f}",
                  flush=True)
    report(x, size, runs, args.json)
    for key, flags in same.items():
        print(f"pruned picks == plain picks, {key}: {sum(flags)}/{len(flags)} seeds")
    return 0


def report(x: torch.Tensor, size: int, runs: dict[str, list[dict]], json_path: Path | None) -> None:
    out = []
    for name, rows in runs.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        out.append({"method": name, "seconds": seconds, "ms_per_step": 1e3 * seconds / size,
                    "coverage_radius": statistics.median(r["radius"] for r in rows),
                    "per_seed_seconds": [r["seconds"] for r in rows], "per_seed_radius": [r["radius"] for r in rows]})
    ref = next((e for e in out if e["method"] == "anomalib KCenterGreedy"), None)
    for e in out:
        e["speedup_vs_anomalib"] = ref["seconds"] / e["seconds"] if ref else float("nan")
        e["radius_vs_anomalib"] = e["coverage_radius"] / ref["coverage_radius"] if ref else float("nan")
    print(f"{'method (medians over seeds)':28s} {'seconds':>9s} {'ms/step':>8s} {'radius':>9s} {'speedup':>8s} "
          f"{'radius/anom':>11s}  radius per seed")
    for e in out:
        print(f"{e['method']:28s} {e['seconds']:9.2f} {e['ms_per_step']:8.3f} {e['coverage_radius']:9.4f} "
              f"{e['speedup_vs_anomalib']:8.1f} {e['radius_vs_anomalib']:11.4f}  "
              + " ".join(f"{r:.2f}" for r in e["per_seed_radius"]))
    if json_path:
        json_path.write_text(json.dumps({"n": len(x), "dim": x.shape[1], "picks": size, "rows": out}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
