"""Greedy coreset on the GPU against the CPU, on the same features: seconds, ms/step, coverage radius.

    python -m experiments.bench.gpu_coreset [--features EMB.npy] [--rows 100000] [--cpu-rows 20000]
        [--ratio 0.1] [--projection-dim 128] [--json OUT.json]

Features: an (N, D) `.npy` of patch embeddings (real ones when you have them; a seeded random
subset of `--rows` rows is read), else a seeded synthetic-but-clustered (N, 1024) float32 set
(clusters of unequal size and spread on a low-rank structure, a few far outliers), whose rows come
in random order. On CUDA: all N rows in float32 and in bfloat16 (`patchcore.coreset.greedy_coreset
(..., precision=...)`); on the CPU: the first `--cpu-rows` rows in float32, and that SAME subset
again on CUDA, so the speed and coverage-radius ratios compare like with like. Every timing is
bracketed by `torch.cuda.synchronize()`; a small warm-up run per precision comes first (cuBLAS
start-up). The coverage radius (the largest distance of a row to its nearest pick, in the full
D: what k-center minimises) is computed on the GPU when there is one. Without CUDA only the CPU
part runs and the GPU part says it was skipped and why.

Used by `python -m experiments.bench.gpu_check` (step "coreset"); prints the JSON it writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore.coreset import coreset_size, coverage_radius, greedy_coreset


def clustered_features(n: int, dim: int = 1024, seed: int = 0, clusters: int = 64,
                       rank: int = 48) -> torch.Tensor:
    """(n, dim) float32 on the CPU: `clusters` Gaussian blobs of unequal size and spread on a
    shared rank-`rank` structure plus isotropic noise, and 0.1% outliers far out (k-center picks
    those early, as it does real rare patches). Generated block by block (bounded memory)."""
    g = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(clusters, dim, generator=g) * 2.0  # (C, dim)
    basis = torch.randn(rank, dim, generator=g) / rank**0.5  # (rank, dim)
    spread = torch.rand(clusters, generator=g) * 1.5 + 0.25  # (C,)
    sizes = torch.rand(clusters, generator=g) ** 2 + 0.02  # unequal cluster weights
    out = torch.empty(n, dim)
    for start in range(0, n, 16384):
        m = min(16384, n - start)
        which = torch.multinomial(sizes, m, replacement=True, generator=g)  # (m,)
        low = torch.randn(m, rank, generator=g) @ basis  # (m, dim)
        out[start : start + m] = centres[which] + spread[which, None] * (low + 0.3 * torch.randn(m, dim, generator=g))
    far = torch.randperm(n, generator=g)[: max(1, n // 1000)]
    out[far] += torch.randn(len(far), dim, generator=g) * 4.0
    return out


def load_features(path: str | Path, rows: int, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of `rows` rows of an (N, D) .npy, as float32 (read through a memory
    map: only the chosen rows are loaded), in random order."""
    store = np.load(str(path), mmap_mode="r")
    if store.ndim != 2:
        raise ValueError(f"{path}: expected an (N, D) array, got shape {store.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(store))[: min(rows, len(store))]
    chosen = np.asarray(store[np.sort(idx)], dtype=np.float32)
    return torch.from_numpy(chosen[rng.permutation(len(chosen))])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_coreset(x: torch.Tensor, size: int, precision: str,
                  projection_dim: int) -> tuple[dict[str, float], torch.Tensor]:
    """({seconds, ms_per_step}, picks) of one greedy_coreset call on x's device (projection
    included: it is part of what a fit pays)."""
    _sync(x.device)
    start = time.perf_counter()
    picks = greedy_coreset(x, size, projection_dim=projection_dim, seed=0, precision=precision)
    _sync(x.device)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 4), "ms_per_step": round(1e3 * seconds / size, 4)}, picks


def radius(x: torch.Tensor, picks: torch.Tensor, device: torch.device) -> float:
    """Coverage radius of the picked rows of x, computed on `device`."""
    xs = x.to(device)
    return coverage_radius(xs.index_select(0, picks.to(device)), xs)


def cpu_part(x: torch.Tensor, ratio: float, projection_dim: int,
             radius_device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    size = coreset_size(len(x), ratio)
    numbers, picks = timed_coreset(x, size, "float32", projection_dim)
    numbers["radius"] = radius(x, picks, radius_device)
    return {"status": "ok", "rows": len(x), "picks": size, "threads": torch.get_num_threads(),
            "float32": numbers}, picks


def gpu_run(x: torch.Tensor, ratio: float, projection_dim: int) -> dict[str, Any]:
    """float32 and bfloat16 on CUDA for all rows of x (already on the GPU)."""
    size = coreset_size(len(x), ratio)
    out: dict[str, Any] = {"rows": len(x), "picks": size}
    for precision in ("float32", "bfloat16"):
        numbers, picks = timed_coreset(x, size, precision, projection_dim)
        numbers["radius"] = radius(x, picks, x.device)
        out[precision] = numbers
        out[f"{precision}_picks"] = picks
    out["bf16_radius_vs_fp32"] = round(out["bfloat16"]["radius"] / out["float32"]["radius"], 5)
    return out


def gpu_part(x: torch.Tensor, cpu_rows: int, ratio: float, projection_dim: int,
             cpu: dict[str, Any], cpu_picks: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """All rows and the CPU's rows on `device` (CUDA; tests pass the CPU to check the bookkeeping)."""
    xg = x.to(device)
    for precision in ("float32", "bfloat16"):  # warm-up: cuBLAS handles, kernels
        greedy_coreset(xg[:4096], 64, projection_dim=projection_dim, precision=precision)
    _sync(device)
    full = gpu_run(xg, ratio, projection_dim)
    same = gpu_run(xg[:cpu_rows], ratio, projection_dim)
    cpu_f32 = cpu["float32"]
    same["speedup_vs_cpu_fp32"] = {p: round(cpu_f32["seconds"] / same[p]["seconds"], 2)
                                   for p in ("float32", "bfloat16")}
    same["radius_vs_cpu_fp32"] = {p: round(same[p]["radius"] / cpu_f32["radius"], 5) for p in ("float32", "bfloat16")}
    gpu_picks = same["float32_picks"].cpu()
    same["fp32_picks_identical"] = bool(torch.equal(gpu_picks, cpu_picks.cpu()))
    same["fp32_picks_shared"] = round(len(set(gpu_picks.tolist()) & set(cpu_picks.tolist())) / len(gpu_picks), 4)
    for part in (full, same):
        part.pop("float32_picks"), part.pop("bfloat16_picks")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"status": "ok", "device": name, "full": full, "same_subset": same}


def measure(x: torch.Tensor, cpu_rows: int, ratio: float, projection_dim: int,
            gpu: torch.device | None = None) -> dict[str, Any]:
    """Both parts; a part that fails says so in one line, the other still runs. `gpu`: the
    device of the GPU part (default: CUDA when available, else that part is skipped)."""
    if gpu is None and torch.cuda.is_available():
        gpu = torch.device("cuda")
    cpu_rows = min(cpu_rows, len(x))
    result: dict[str, Any] = {}
    cpu_picks = None
    start = time.perf_counter()
    try:
        result["cpu"], cpu_picks = cpu_part(x[:cpu_rows], ratio, projection_dim, gpu or torch.device("cpu"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the check goes on
        result["cpu"] = {"status": "failed", "error": _one_line(exc)}
    result["cpu"]["wall_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    if gpu is None:
        result["gpu"] = {"status": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is False)"}
    elif cpu_picks is None:
        result["gpu"] = {"status": "skipped", "reason": "the CPU part failed: nothing to compare with"}
    else:
        try:
            result["gpu"] = gpu_part(x, cpu_rows, ratio, projection_dim, result["cpu"], cpu_picks, gpu)
        except Exception as exc:  # noqa: BLE001
            result["gpu"] = {"status": "failed", "error": _one_line(exc)}
    result["gpu"]["wall_s"] = round(time.perf_counter() - start, 3)  # the GPU's warm-up included
    return result


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="(N, D) .npy of patch embeddings (default: synthetic clustered, D=1024)")
    p.add_argument("--rows", type=int, default=100_000, help="rows used on the GPU")
    p.add_argument("--cpu-rows", type=int, default=20_000, help="the subset run on both devices")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--projection-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.features:
        x, source = load_features(args.features, args.rows, args.seed), str(Path(args.features).resolve())
    else:
        x, source = clustered_features(args.rows, 1024, args.seed), f"synthetic clustered (seed {args.seed})"
    result = {"features": {"source": source, "rows": len(x), "dim": int(x.shape[1]),
                           "make_s": round(time.perf_counter() - start, 3)},
              "ratio": args.ratio, "projection_dim": args.projection_dim,
              **measure(x, args.cpu_rows, args.ratio, args.projection_dim)}
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if "failed" not in (result["cpu"]["status"], result["gpu"]["status"]) else 1


if __name__ == "__main__":
    sys.exit(main())
