"""`fedpatch compare`: federated vs centralized vs local-only PatchCore on the same images.

1. plan the factories (federated/plan.py: the same shards every process computes);
2. centralized: one PatchCore per category on the union of all factories' training images
   (each image with its factory's domain shift), scored on the union of their test images;
3. federated: the Flower apps through Ray (`run_simulation`); the global banks they write are
   scored on the same union test set, and each factory reports metrics on its own test images;
4. local-only: each factory alone, scored on its own test images;
then results.json / results.csv / report.md / plots / manifest.json under results/compare-*/,
and per-image results (images.csv, maps/, factory_metrics.csv: experiments/app/image_results.py)
for `fedpatch dashboard`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.app import plots
from experiments.app.image_results import ImageResults, decision_threshold
from experiments.app.report_md import write_report
from experiments.app.reports import finite_mean, flat_metrics, format_table, write_table
from experiments.app.runs import Manifest, new_run_dir, write_config, write_json
from experiments.app.simulation import check_placeable, run_federation
from federated.config import ExperimentConfig
from federated.plan import plan_factories
from patchcore.cache import FeatureCache
from patchcore.config import load_config
from patchcore.coreset import coverage_radius
from patchcore.fitting import evaluate_scored, fit_category, score_records
from patchcore.memory_bank import MemoryBank
from patchcore.model import PatchCore


def _by_category(records: list, category: str, split: str) -> list:
    return [r for r in records if r.category == category and r.split == split]


def run_centralized(config: ExperimentConfig, plan: Any, run_dir: Path, progress: bool,
                    images: ImageResults | None = None) -> dict[str, Any]:
    """Per category: fit on the union, score the union test set; keeps features for coverage."""
    out: dict[str, Any] = {}
    everything = [r for s in plan.shards for r in (*s.train, *s.validation, *s.test)]
    model = PatchCore(config.model, device=config.device, seed=config.seed)
    model.cache = FeatureCache.under(config.data, "central")  # data.cache_dir/central
    for category in plan.categories:
        records = [r for r in everything if r.category == category]
        start = time.time()
        model, features = fit_category(config, category, records, plan.shifts, progress, model=model)
        fit_s = time.time() - start
        model.bank.save(run_dir / "centralized" / "banks" / category)
        scored = score_records(model, _by_category(records, category, "test"), config, plan.shifts, progress,
                               desc=f"score central {category}")
        metrics = evaluate_scored(scored, config, plan.root, category)
        out[category] = {"metrics": metrics, "bank_size": len(model.bank),
                         "features": features.cpu(), "fit_s": fit_s, "score_s": time.time() - start - fit_s,
                         "coverage_radius": coverage_radius(model.bank.features, features)}
        _keep_images(images, "centralized", category, scored, model.bank, metrics, config, plan)
    return out


def _keep_images(images: ImageResults | None, name: str, category: str, scored: Any, bank: MemoryBank,
                 metrics: dict[str, Any], config: ExperimentConfig, plan: Any) -> None:
    """Per-image rows of a model that saw every factory's test images, and its per-factory metrics."""
    if images is None:
        return
    images.add(name, category, scored, decision_threshold(bank.metadata, metrics))
    images.add_per_factory(name, category, scored, lambda part: evaluate_scored(part, config, plan.root, category))


def score_federated(config: ExperimentConfig, plan: Any, run_dir: Path, central: dict[str, Any],
                    progress: bool, images: ImageResults | None = None) -> dict[str, Any]:
    """The global banks the server wrote, scored on the union test set."""
    out: dict[str, Any] = {}
    everything = [r for s in plan.shards for r in s.test]
    for category in plan.categories:
        path = run_dir / "federated" / "banks" / f"{category}.safetensors"
        if not path.is_file():
            out[category] = None
            continue
        bank = MemoryBank.load(path)
        model = PatchCore.from_bank(bank, config.model, device=config.device)
        start = time.time()
        scored = score_records(model, _by_category(everything, category, "test"), config, plan.shifts, progress,
                               desc=f"score federated {category}")
        features = central[category]["features"]
        metrics = evaluate_scored(scored, config, plan.root, category)
        out[category] = {
            "metrics": metrics, "bank_size": len(bank),
            "score_s": time.time() - start,
            "coverage_radius": coverage_radius(bank.features, features),
        }
        _keep_images(images, "federated", category, scored, bank, metrics, config, plan)
    return out


def run_local(config: ExperimentConfig, plan: Any, progress: bool, run_dir: Path | None = None,
              images: ImageResults | None = None) -> dict[str, dict[str, Any]]:
    """Each factory alone: {category: {factory name: metrics}}; banks under run_dir/local/<factory>/."""
    out: dict[str, dict[str, Any]] = {c: {} for c in plan.categories}
    model = PatchCore(config.model, device=config.device, seed=config.seed)  # one backbone for all fits
    for shard in plan.shards:
        model.cache = FeatureCache.under(config.data, shard.name)  # the factory's own, as its Site's
        for category in plan.categories:
            records = [r for r in (*shard.train, *shard.validation, *shard.test) if r.category == category]
            train, test = _by_category(records, category, "train"), _by_category(records, category, "test")
            if not train or not test:
                continue
            model, _ = fit_category(config, category, records, plan.shifts, progress=False, model=model)
            scored = score_records(model, test, config, plan.shifts, progress=False)
            metrics = evaluate_scored(scored, config, plan.root, category)
            out[category][shard.name] = {**metrics, "bank_size": len(model.bank), "num_train": len(train)}
            if run_dir is not None:
                model.bank.save(run_dir / "local" / shard.name / "banks" / category)
            if images is not None:
                images.add("local", category, scored, decision_threshold(model.bank.metadata, metrics))
                images.add_factory_metrics("local", category, shard.name, metrics)
            if progress:
                print(f"local {shard.name}/{category}: image AUROC {out[category][shard.name]['image_auroc']:.3f}")
    return out


def result_rows(plan: Any, central: dict, federated: dict, local: dict) -> list[dict[str, Any]]:
    """One row per (category, method) with the headline metrics."""
    rows = []
    for category in plan.categories:
        c = central[category]
        rows.append({"category": category, "method": "centralized", **flat_metrics(c["metrics"]),
                     "bank_size": c["bank_size"], "coverage_radius": c["coverage_radius"]})
        f = federated.get(category)
        if f is not None:
            rows.append({"category": category, "method": "federated", **flat_metrics(f["metrics"]),
                         "bank_size": f["bank_size"], "coverage_radius": f["coverage_radius"]})
        per_factory = local.get(category, {})
        if per_factory:
            keys = [k for k in ("image_auroc", "pixel_auroc", "aupro", "auc_spro_0.05", "f1_max")
                    if all(k in m for m in per_factory.values())]
            values = {k: [m[k] for m in per_factory.values()] for k in keys}
            rows.append({"category": category, "method": f"local (mean of {len(per_factory)})",
                         **{k: finite_mean(v) for k, v in values.items()},  # None: no factory could
                         "bank_size": int(round(np.mean([m["bank_size"] for m in per_factory.values()]))),
                         "coverage_radius": None})
    return rows


def upload_rows(federation: dict[str, Any]) -> list[dict[str, Any]]:
    """Bytes each factory uploaded vs its raw patch features."""
    rows = []
    for name, stats in sorted(federation.get("factories", {}).items()):
        rows.append({"factory": name, "bytes_sent": stats.get("bytes_sent"),
                     "raw_feature_bytes": stats.get("raw_feature_bytes"),
                     "upload_ratio": stats.get("upload_ratio"), "vectors_sent": stats.get("vectors_sent")})
    return rows


def write_plots(run_dir: Path, rows: list[dict[str, Any]], uploads: list[dict[str, Any]], plan: Any) -> list[Path]:
    paths = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        series = {m: [next((r[metric] for r in rows if r["category"] == c and r["method"] == m), np.nan)
                      for c in plan.categories] for m in methods}
        values = [v for vs in series.values() for v in vs if np.isfinite(v)]
        low = max(0.0, np.floor((min(values, default=0.0) - 0.02) * 20) / 20)  # zoom: differences are small
        paths.append(plots.grouped_bars(plan.categories, series, run_dir / f"{metric}.png", metric.replace("_", " "),
                                        f"{metric.replace('_', ' ')}: federated vs centralized vs local",
                                        ylim=(low, 1.01)))
    if uploads:
        mib = 1 / (1 << 20)
        series = {"raw patch features": [u["raw_feature_bytes"] * mib for u in uploads],
                  "uploaded": [u["bytes_sent"] * mib for u in uploads]}
        paths.append(plots.grouped_bars([u["factory"] for u in uploads], series, run_dir / "upload_bytes.png",
                                        "MiB", "bytes uploaded per factory"))
    return paths


def run_compare(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    progress = not args.quiet
    config = load_config(args.config, ExperimentConfig, overrides)
    check_placeable(config)  # Ray could never place a client: say so now, not after the baseline
    plan = plan_factories(config)  # validates data before anything is written
    run_dir = new_run_dir(config.output_dir, "compare", args.out)
    write_config(run_dir, config)
    manifest = Manifest(run_dir, config, "compare")
    manifest.write(status="running", data_root=str(plan.root),
                   factories={s.name: {"train": len(s.train), "test": len(s.test)} for s in plan.shards})
    images = ImageResults(run_dir)
    start = time.time()
    central = run_centralized(config, plan, run_dir, progress, images)
    manifest.time("centralized", time.time() - start)
    start = time.time()
    federation = run_federation(args.config, overrides, run_dir, verbose=False)
    manifest.time("federation", time.time() - start)
    start = time.time()
    federated = score_federated(config, plan, run_dir, central, progress, images)
    manifest.time("federated_scoring", time.time() - start)
    start = time.time()
    local = run_local(config, plan, progress, run_dir, images) if config.federation.local_only else {}
    manifest.time("local_only", time.time() - start)
    rows = result_rows(plan, central, federated, local)
    uploads = upload_rows(federation)
    results = {"rows": rows, "uploads": uploads, "federation": federation, "local": local,
               "centralized": {c: v["metrics"] for c, v in central.items()},
               "federated": {c: (v["metrics"] if v else None) for c, v in federated.items()},
               "timings_s": manifest.data["timings_s"]}
    write_json(run_dir / "results.json", results)
    write_table(run_dir / "results.csv", rows)
    if uploads:
        write_table(run_dir / "uploads.csv", uploads)
    figures = write_plots(run_dir, rows, uploads, plan)
    images.write()
    write_report(run_dir / "report.md", config, plan, rows, uploads, federation, manifest.data["timings_s"], figures)
    manifest.write(status="complete")
    print(format_table(rows, ("category", "method", "image_auroc", "pixel_auroc", "aupro", "bank_size",
                              "coverage_radius")))
    if uploads:
        print()
        print(format_table(uploads, ("factory", "bytes_sent", "raw_feature_bytes", "upload_ratio")))
    print(f"\nreport: {run_dir / 'report.md'}")
    return 0
