"""Load run of the inspection API: a real `fedpatch serve` process hit by a small thread pool.

    python -m experiments.bench.serve_load [BANK] [--images DIR] [-n 200] [--concurrency 4]
        [--device auto] [--no-heatmap]

Without BANK, fits one first (configs/default.yaml, category disc, 128 px synthetic images, in
a temporary folder). Starts `fedpatch serve` on 127.0.0.1 and a free port in a subprocess (its
own interpreter, so client threads do not share the server's GIL), waits for /health, sends one
warm-up request, then N POST /inspect requests from `--concurrency` threads, cycling through the
images (default: synthetic test images). Prints the count, errors, client-side latency
percentiles (upload to parsed answer) and requests per second, then stops the server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from experiments.app.local_server import free_port, stop

REPO = Path(__file__).resolve().parents[2]


def fit_default_bank(work: Path) -> tuple[Path, Path]:
    """A disc bank fitted on synthetic images under `work`; returns (bank, test image folder)."""
    from experiments.app.cli import main

    root = work / "synthetic"
    code = main(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--category", "disc", "--quiet",
                 "--set", f"data.root={root}", "--out", str(work / "run")])
    if code != 0:
        raise SystemExit(f"fitting the default bank failed (exit {code})")
    return work / "run" / "banks" / "disc.safetensors", root / "disc" / "test"


def synthetic_images(work: Path) -> Path:
    from patchcore.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(work / "synthetic", categories=("disc",), n_train=1) / "disc" / "test"


def start_server(bank: Path, port: int, device: str) -> subprocess.Popen:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "experiments.app.cli", "serve", str(bank), "--host", "127.0.0.1",
           "--port", str(port), "--device", device]
    return subprocess.Popen(cmd, cwd=REPO, env=env)


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was healthy")
        try:
            return httpx.get(f"{base}/health", timeout=2.0).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.25)
    raise SystemExit(f"no healthy server at {base} after {timeout:.0f} s")


def run_load(base: str, images: list[Path], n: int, concurrency: int, heatmap: bool) -> dict:
    payloads = [(p.name, p.read_bytes()) for p in images]
    query = "" if heatmap else "?heatmap=false"

    with httpx.Client(base_url=base, timeout=60.0,
                      limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(i: int) -> tuple[float, bool, float]:
            name, data = payloads[i % len(payloads)]
            start = time.perf_counter()
            try:
                r = client.post(f"/inspect{query}", files={"file": (name, data, "image/png")})
                ok = r.status_code == 200
                server_ms = r.json()["latency_ms"] if ok else float("nan")
            except httpx.HTTPError:
                ok, server_ms = False, float("nan")
            return (time.perf_counter() - start) * 1e3, ok, server_ms

        one(0)  # warm-up: first-call allocations and lazy imports
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - start
    latency = np.array([r[0] for r in results])
    server = np.array([r[2] for r in results if r[1]])
    return {"count": n, "errors": sum(not r[1] for r in results), "wall_s": wall, "rps": n / wall,
            **{f"p{q}_ms": float(np.percentile(latency, q)) for q in (50, 90, 99)},
            "max_ms": float(latency.max()),
            "server_p50_ms": float(np.median(server)) if len(server) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bank", nargs="?", help="a .safetensors bank (default: fit one on synthetic images)")
    p.add_argument("--images", help="folder of PNG images to send, searched recursively (default: synthetic)")
    p.add_argument("-n", type=int, default=200, help="requests (after one warm-up)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--device", default="auto", help="the server's device")
    p.add_argument("--no-heatmap", action="store_true", help="ask for the JSON without heatmap_png")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fedpatch-serve-load-") as tmp:
        work = Path(tmp)
        if args.bank:
            bank, folder = Path(args.bank), Path(args.images) if args.images else synthetic_images(work)
        else:
            bank, folder = fit_default_bank(work)
            folder = Path(args.images) if args.images else folder
        images = sorted(folder.rglob("*.png"))
        if not images:
            raise SystemExit(f"no PNG images under {folder}")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(bank, port, args.device)
        try:
            health = wait_healthy(base, server)
            stats = run_load(base, images, args.n, args.concurrency, not args.no_heatmap)
        finally:
            stop(server, timeout=15)
    print(f"bank {bank.name} on {health['device']}, {len(images)} distinct images, concurrency {args.concurrency}, "
          f"heatmap {'off' if args.no_heatmap else 'on'}")
    print(f"requests {stats['count']}  errors {stats['errors']}  "
          f"p50 {stats['p50_ms']:.1f} ms  p90 {stats['p90_ms']:.1f} ms  p99 {stats['p99_ms']:.1f} ms  "
          f"max {stats['max_ms']:.1f} ms  {stats['rps']:.1f} req/s  (server-side p50 {stats['server_p50_ms']:.1f} ms)")
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
