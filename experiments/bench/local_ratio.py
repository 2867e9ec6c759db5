"""Federated parity at equal bank size: which local coreset ratio (as a multiple of the global one)?

    python -m experiments.bench.local_ratio --config configs/shared_real.yaml --out DIR \
        [--seeds 0 1 2] [--partitions iid category] [--category tire]

Runs `fedpatch sweep ratio` (experiments/research/sweeps.py: centralized bank at global_ratio, and the
federation with local_ratio = 1x, 2x, 4x global_ratio through the real rounds) once per seed and
partition, on one shared feature cache (the backbone runs once per image), then writes
summary.csv / summary.md: per partition and local factor, the federated minus centralized image
and pixel AUROC (mean and std over seeds, paired by seed: same images, same bank size), the
coverage-radius ratio and the bytes each federation uploaded.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
from pathlib import Path

from experiments.app.cli import main as fedpatch
from experiments.app.runs import new_run_dir, write_json

REPO = Path(__file__).resolve().parents[2]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict], category: str) -> list[dict]:
    """Per (partition, variant): federated - centralized, paired by seed."""
    central = {(r["partition"], r["seed"]): r for r in rows
               if r["method"] == "centralized" and r["category"] == category}
    out = []
    keys = sorted({(r["partition"], r["variant"]) for r in rows
                   if r["method"] == "federated" and r["category"] == category})
    for partition, variant in keys:
        fed = [r for r in rows if (r["partition"], r["variant"], r["category"]) == (partition, variant, category)]
        pairs = [(r, central[(partition, r["seed"])]) for r in fed]
        row = {"category": category, "partition": partition, "variant": variant, "seeds": len(pairs)}
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            row[f"d_{key}"], row[f"d_{key}_std"] = mean_std([float(f[key]) - float(c[key]) for f, c in pairs])
            row[f"central_{key}"] = statistics.mean(float(c[key]) for _, c in pairs)
        row["radius_ratio"], row["radius_ratio_std"] = mean_std(
            [float(f["coverage_radius"]) / float(c["coverage_radius"]) for f, c in pairs])
        row["bank_size"] = statistics.mean(int(f["bank_size"]) for f, _ in pairs)
        row["central_bank_size"] = statistics.mean(int(c["bank_size"]) for _, c in pairs)
        row["bytes_sent"] = statistics.mean(int(f["bytes_sent"]) for f, _ in pairs)
        out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| partition | variant | bank (fed / central) | Δ image AUROC | Δ pixel AUROC | Δ AUPRO "
             "| radius fed/central | MB uploaded |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['partition']} | {r['variant']} | {r['bank_size']:.0f} / {r['central_bank_size']:.0f} | "
                     f"{r['d_image_auroc']:+.4f} ± {r['d_image_auroc_std']:.4f} | "
                     f"{r['d_pixel_auroc']:+.4f} ± {r['d_pixel_auroc_std']:.4f} | "
                     f"{r['d_aupro']:+.4f} ± {r['d_aupro_std']:.4f} | "
                     f"{r['radius_ratio']:.4f} ± {r['radius_ratio_std']:.4f} | {r['bytes_sent'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "shared_real.yaml"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitions", nargs="+", default=["iid", "category"])
    parser.add_argument("--category", default="tire", help="the category the summary reports")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = new_run_dir(REPO / "results", "bench-local-ratio", args.out)
    cache = out / "features"
    rows: list[dict] = []
    for seed in args.seeds:
        for partition in args.partitions:
            run = out / f"seed{seed}-{partition}"
            sets = [*args.set, f"seed={seed}", f"federation.partition={partition}", f"data.cache_dir={cache}"]
            code = fedpatch(["sweep", "ratio", "--config", args.config, "--out", str(run), "--quiet",
                             *[x for s in sets for x in ("--set", s)]])
            if code != 0:
                raise SystemExit(f"sweep failed for seed {seed}, partition {partition} (exit {code})")
            with open(run / "sweep.csv") as handle:
                rows += [{**r, "seed": seed, "partition": partition} for r in csv.DictReader(handle)]
    shutil.rmtree(cache, ignore_errors=True)
    summary = summarise(rows, args.category)
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    write_json(out / "rows.json", rows)
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
