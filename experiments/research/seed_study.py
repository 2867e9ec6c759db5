"""Federated vs centralized vs local-only over several seeds and partition schemes.

    python -m experiments.research.seed_study --config configs/shared_real.yaml --seeds 0 1 2 \\
        --partitions iid category dirichlet [--alpha 0.5] [--out results/study]

For each seed the centralized PatchCore is fitted once (the union of all factories' images does
not depend on the partition when domain shift is off) and reused for every scheme; each scheme
then runs the Flower federation, scores its global banks on the same union test set, and fits
the local-only models. Writes study.json, study.csv (every run), summary.csv and summary.md
(mean ± std over seeds), and one bar plot per metric.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from experiments.app import plots
from experiments.app.compare import result_rows, run_centralized, run_local, score_federated, upload_rows
from experiments.app.reports import write_table
from experiments.app.runs import Manifest, new_run_dir, write_json
from experiments.app.simulation import run_federation
from federated.config import ExperimentConfig
from federated.plan import plan_factories
from patchcore.config import load_config
from patchcore.errors import FedpatchError

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_study(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = load_config(args.config, ExperimentConfig, {})
    if base.federation.domain_shift:
        raise FedpatchError("seed_study reuses one centralized fit across partitions: "
                            "set federation.domain_shift false")
    out = new_run_dir(base.output_dir, "study", args.out)
    manifest = Manifest(out, base, "seed_study")
    manifest.write(status="running", seeds=args.seeds, partitions=args.partitions)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        config = load_config(args.config, ExperimentConfig, {"seed": seed})
        central = run_centralized(config, plan_factories(config), out / f"seed-{seed}", not args.quiet)
        for scheme in args.partitions:
            overrides = {"seed": seed, "federation.partition": scheme, "federation.alpha": args.alpha}
            config = load_config(args.config, ExperimentConfig, overrides)
            plan = plan_factories(config)
            run_dir = out / f"seed-{seed}" / scheme
            federation = run_federation(args.config, overrides, run_dir)
            federated = score_federated(config, plan, run_dir, central, not args.quiet)
            local = run_local(config, plan, not args.quiet)
            uploads = upload_rows(federation)
            max_ratio = max((u["upload_ratio"] for u in uploads), default=float("nan"))
            for row in result_rows(plan, central, federated, local):
                method = "local" if row["method"].startswith("local") else row["method"]
                rows.append({"seed": seed, "partition": scheme, **row, "method": method, "max_upload_ratio": max_ratio})
            write_table(out / "study.csv", rows)  # progress survives an interruption
            print(f"seed {seed} {scheme}: done")
    summary = summarize(rows)
    write_json(out / "study.json", {"rows": rows, "summary": summary})
    write_table(out / "summary.csv", summary)
    write_markdown(out / "summary.md", summary, args)
    for metric in METRICS:
        plot_metric(out, summary, metric)
    manifest.write(status="complete")
    print((out / "summary.md").read_text())
    return summary


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mean ± std over seeds per (partition, category, method); std is the sample std (ddof=1)."""
    keys = sorted({(r["partition"], r["category"], r["method"]) for r in rows})
    out = []
    for partition, category, method in keys:
        group = [r for r in rows if (r["partition"], r["category"], r["method"]) == (partition, category, method)]
        entry: dict[str, Any] = {"partition": partition, "category": category, "method": method, "seeds": len(group)}
        for metric in METRICS:
            values = np.array([r[metric] for r in group], dtype=float)
            entry[f"{metric}_mean"] = float(np.mean(values))
            entry[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def write_markdown(path: Path, summary: list[dict[str, Any]], args: argparse.Namespace) -> None:
    lines = [f"# Seed study: {args.config}, seeds {args.seeds}, dirichlet alpha {args.alpha}\n",
             "| partition | category | method | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|---|"]
    for e in summary:
        cells = [f"{e[f'{m}_mean']:.4f} ± {e[f'{m}_std']:.4f}" for m in METRICS]
        lines.append(f"| {e['partition']} | {e['category']} | {e['method']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot_metric(out: Path, summary: list[dict[str, Any]], metric: str) -> None:
    groups = sorted({f"{e['partition']}/{e['category']}" for e in summary})
    methods = sorted({e["method"] for e in summary})
    find = {(f"{e['partition']}/{e['category']}", e["method"]): e for e in summary}
    series = {m: [find[(g, m)][f"{metric}_mean"] if (g, m) in find else np.nan for g in groups] for m in methods}
    errors = {m: [find[(g, m)][f"{metric}_std"] if (g, m) in find else 0.0 for g in groups] for m in methods}
    low = max(0.0, np.floor((np.nanmin([v for vs in series.values() for v in vs]) - 0.03) * 20) / 20)
    plots.grouped_bars(groups, series, out / f"{metric}.png", metric.replace("_", " "),
                       f"{metric.replace('_', ' ')}: mean ± std over seeds", errors=errors, ylim=(low, 1.01))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--partitions", nargs="+", default=["iid", "category", "dirichlet"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        run_study(args)
    except FedpatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
