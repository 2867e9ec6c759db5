"""Nearest-neighbour scoring: torch exact (float32 products, and bf16 products + exact re-ranking)
vs FAISS flat vs FAISS IVF-PQ on the real tire bank.

    python -m experiments.bench.nn [--repeats 3] [--ivfpq NLIST,M,NBITS,NPROBE[,REFINE] ...]
        [--no-faiss]

The bank is the 10% greedy coreset (paper defaults, seed 0) of the cached tire training
embeddings (~16k x 1024); the queries are the tire test embeddings (~88k x 1024, 112 images),
both from experiments/bench/coreset.py's cache. Every backend goes through `MemoryBank.nearest`,
so the timed path is the one PatchCore scores with. Reported per backend: index build seconds,
search seconds (median of repeats), recall@1 (same bank row as the exact search), the median and
max relative error of the squared distance (the patch score), and the image/pixel AUROC of tire
with score = max patch distance and maps = bilinear upsampling + Gaussian sigma 4, as PatchCore.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.bench.coreset import CACHE, tire_embeddings

DEFAULT_IVFPQ = ["64,64,8,8", "64,64,8,32", "64,128,8,8", "256,64,8,16", "64,32,8,8", "64,64,8,8,4"]


def tire_bank(cache: Path = CACHE) -> torch.Tensor:
    """The 10% greedy coreset of the tire training embeddings (cached)."""
    path = cache / "tire_bank.npy"
    if not path.is_file():
        from patchcore.coreset import coreset_size, greedy_coreset

        feats = torch.from_numpy(np.load(tire_embeddings("train")))
        idx = greedy_coreset(feats, coreset_size(len(feats), 0.1), seed=0, progress=True)
        np.save(path, feats[idx].numpy())
    return torch.from_numpy(np.load(path))


def metrics(dist: torch.Tensor, labels: np.ndarray, masks: np.ndarray, grid: tuple[int, int]) -> dict:
    """Squared patch distances (Q,) -> image and pixel AUROC on tire."""
    from patchcore.anomaly_map import to_pixel_maps
    from patchcore.metrics import image_auroc, pixel_auroc

    patch = dist.reshape(len(labels), *grid)  # (N, h, w)
    maps = to_pixel_maps(patch, tuple(masks.shape[-2:]), 4.0).numpy()
    return {"image_auroc": image_auroc(labels, patch.flatten(1).max(dim=1).values.numpy()),
            "pixel_auroc": pixel_auroc(masks.astype(bool), maps)}


def run(bank: torch.Tensor, queries: torch.Tensor, backend: str, ivfpq, repeats: int,
        nn_precision: str = "float32") -> dict:
    from patchcore.memory_bank import MemoryBank

    mb = MemoryBank(bank, nn_backend=backend, ivfpq=ivfpq, nn_precision=nn_precision)
    start = time.perf_counter()
    mb.nearest(queries[:1])  # builds (and for IVF-PQ trains) the index
    build = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        d, i = mb.nearest(queries)
        times.append(time.perf_counter() - start)
    return {"build_s": build, "search_s": statistics.median(times), "all_search_s": times,
            "d": d[:, 0].cpu(), "i": i[:, 0].cpu()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ivfpq", nargs="*", default=DEFAULT_IVFPQ, help="NLIST,M,NBITS,NPROBE[,REFINE]")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-faiss", action="store_true", help="torch float32 vs bf16 + re-rank only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids OpenMP barrier stalls on a shared, oversubscribed machine)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    from patchcore.config import IvfPqConfig

    bank = tire_bank()
    queries = torch.from_numpy(np.load(tire_embeddings("test")))
    labels = np.load(CACHE / "tire_test_labels.npy")
    masks = np.load(CACHE / "tire_test_masks.npy")
    grid = tuple(json.loads((CACHE / "tire_test_grid.json").read_text())["grid"])
    print(f"bank {tuple(bank.shape)}, queries {tuple(queries.shape)}, {len(labels)} images, "
          f"threads {torch.get_num_threads()}", flush=True)
    variants = [("torch exact (float32 products)", "torch", None, "float32"),
                ("torch exact (bf16 products + re-rank)", "torch", None, "bfloat16")]
    if not args.no_faiss:
        variants.append(("faiss flat", "faiss", None, "float32"))
    for spec in ([] if args.no_faiss else args.ivfpq):
        values = [int(v) for v in spec.split(",")]
        cfg = IvfPqConfig(*values)
        variants.append((f"ivfpq nlist={cfg.nlist} m={cfg.m} nbits={cfg.nbits} nprobe={cfg.nprobe}"
                         + (f" refine={cfg.refine}" if cfg.refine else ""), "faiss_ivfpq", cfg, "float32"))
    rows, ref = [], None
    for name, backend, cfg, precision in variants:
        r = run(bank, queries, backend, cfg, args.repeats if backend != "faiss_ivfpq" else max(1, args.repeats),
                precision)
        if ref is None:
            ref = r
        rel = (r["d"] - ref["d"]).abs() / ref["d"].clamp(min=1e-12)
        row = {"backend": name, "build_s": r["build_s"], "search_s": r["search_s"], "all_search_s": r["all_search_s"],
               "recall_at_1": float((r["i"] == ref["i"]).float().mean()),
               "median_rel_err": float(rel.median()), "max_rel_err": float(rel.max()),
               **metrics(r["d"], labels, masks, grid)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'backend':42s} {'build s':>8s} {'search s':>9s} {'speedup':>8s} {'recall@1':>9s} "
          f"{'med rel':>8s} {'img AUROC':>9s} {'px AUROC':>9s}")
    for row in rows:
        print(f"{row['backend']:42s} {row['build_s']:8.2f} {row['search_s']:9.2f} "
              f"{rows[0]['search_s'] / row['search_s']:8.1f} {row['recall_at_1']:9.4f} {row['median_rel_err']:8.4f} "
              f"{row['image_auroc']:9.4f} {row['pixel_auroc']:9.4f}")
    if args.json:
        args.json.write_text(json.dumps({"bank": list(bank.shape), "queries": list(queries.shape), "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
