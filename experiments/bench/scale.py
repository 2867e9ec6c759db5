"""A 100-factory federation on one machine: wall time and peak memory of the whole process tree.

    python -m experiments.bench.scale [--factories 100] [--size 64] [--config configs/default.yaml]
        [--out results/bench-scale] [--set key=value ...]

Runs `experiments.app.simulation.run_federation` (Flower + Ray, the real ClientApp and ServerApp) on
the synthetic factories with `--factories` clients, each holding at least one training image per
category, and polls the process tree with psutil every 0.5 s (this process, Ray's GCS, raylet,
workers): the peak of the summed RSS (counts shared pages once per process: an upper bound) and
of the summed PSS (shared pages split between their users: what the tree really holds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import psutil  # noqa: E402

from experiments.app.simulation import descendants, run_federation  # noqa: E402


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; PSS is 0 where the platform has none; (0, 0) when it
    is gone or not ours to read."""
    try:
        process = psutil.Process(pid)
        rss = process.memory_info().rss
    except psutil.Error:
        return 0, 0
    try:
        pss = getattr(process.memory_full_info(), "pss", 0)  # Linux: smaps_rollup
    except psutil.Error:
        pss = 0
    return rss, pss


class TreeMemory:
    """Peak summed RSS and PSS (bytes) of this process and its descendants, polled."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def sample(self) -> None:
        pids = [os.getpid(), *descendants()]
        sizes = [_memory(p) for p in pids]
        rss, pss = sum(r for r, _ in sizes), sum(p for _, p in sizes)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _poll(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(interval_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def overrides_for(factories: int, size: int, extra: list[str]) -> dict:
    """Tiny synthetic factories: one training image per category and factory, a few test ones."""
    o = {"federation.num_factories": factories, "federation.partition": "iid",
         "data.resize": size, "data.crop": size, "data.synthetic.size": size,
         "data.synthetic.n_train": factories, "data.synthetic.n_test_good": factories,
         "data.synthetic.n_test_defect": factories, "federation.node_timeout_s": 600.0}
    for item in extra:
        key, _, value = item.partition("=")
        o[key] = json.loads(value) if value[:1] in "[{0123456789-tfn\"" else value
    return o


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factories", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--out", default=str(REPO / "results" / "bench-scale"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    overrides = overrides_for(args.factories, args.size, args.set)
    start = time.perf_counter()
    with TreeMemory() as memory:
        report = run_federation(args.config, overrides, args.out)
    wall = time.perf_counter() - start
    memory.sample()
    clients = report.get("factories") or report.get("clients") or {}
    print(f"factories {args.factories}, {args.size} px, status {report.get('status')}, "
          f"{len(clients) if hasattr(clients, '__len__') else '?'} factory entries in federation.json")
    print(f"wall time {wall:.1f} s ({wall / args.factories:.2f} s per factory)")
    print(f"peak process tree: RSS {memory.peak_rss / 2**30:.2f} GiB (sum, upper bound), "
          f"PSS {memory.peak_pss / 2**30:.2f} GiB, up to {memory.peak_processes} processes")
    print(f"Ray processes started: {len(report.get('ray_processes', []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
