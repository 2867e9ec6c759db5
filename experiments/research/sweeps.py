"""`fedpatch sweep privacy|encoding|poisoning`: what each protection costs in detection quality.

Features are extracted once (data.cache_dir, or a folder of the sweep's own that is removed at
the end) and every variant is a whole federation replayed on them (experiments/research/replay.py: the
real Sites and rounds over the in-process transport; a variant that projects or clips the
features reads the same cached embeddings and transforms them). Each variant's federation.json (and, with
--keep-banks, its global banks) stays under federations/NN/.

- privacy: ε ∈ {0.5, 1, 2, 4, 8, ∞} (δ, clip_norm from the config). A centralized PatchCore with
  the same clipping (no noise: it releases nothing) and one without clipping are the references.
- encoding: float32 / float16 / int8 payloads, and float16 after a shared random projection to
  256 and 128 dims (model.transform.projection_dim; the scorer projects its queries too).
- poisoning: one factory (the last) turns hostile — it builds its coreset from its own defective
  test images, or sends noise — and the server screens with federation.poison_mode off, flag,
  exclude, filter. All rows are scored on one test set: the union test set without the images
  the poisoner trained on.

Writes sweep.csv, sweep.json, one plot per sweep, report.md and manifest.json under
results/sweep-<kind>-*/.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.app.reports import format_table, write_table
from experiments.app.runs import Manifest, new_run_dir, write_json
from experiments.research.replay import Replay, extract, variant
from federated.config import POISON_MODES, ExperimentConfig
from federated.partition import factory_name
from federated.plan import plan_factories
from patchcore.config import TransformConfig, load_config
from patchcore.errors import ConfigError
from patchcore.memory_bank import atomic_write_bytes
from patchcore.model import PatchCore, embedding_dim

KINDS = ("privacy", "encoding", "poisoning", "ratio")
LOCAL_FACTORS = (1.0, 2.0, 4.0)  # the ratio sweep's local ratios, as multiples of the global one
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
ENCODINGS = (("float32", None), ("float16", None), ("int8", None), ("float16", 256), ("float16", 128))


def _row(label: str, metrics: dict[str, dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """One row per category; an `extra` value that is a {category: value} dict is split up."""
    rows = []
    for category, m in sorted(metrics.items()):
        own = {k: (v.get(category) if isinstance(v, dict) else v) for k, v in extra.items()}
        rows.append({"variant": label, "category": category, "image_auroc": m["image_auroc"],
                     "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro"), **own})
    return rows


def sweep_privacy(base: ExperimentConfig, replay: Replay, epsilons: tuple[float, ...]) -> list[dict[str, Any]]:
    if base.model.transform.clip_norm is None:
        raise ConfigError("the privacy sweep needs model.transform.clip_norm (set it in the config)")
    factories = list(range(base.federation.num_factories))
    rows = []
    plain = variant(base, **{"model.transform": TransformConfig(), "federation.privacy.epsilon": None})
    rows += _row("centralized, no clipping", replay.score(plain, replay.centralized(plain, list(factories))),
                 method="centralized", epsilon=None)
    clipped = variant(base, **{"federation.privacy.epsilon": None})
    rows += _row("centralized, clipped", replay.score(clipped, replay.centralized(clipped, list(factories))),
                 method="centralized", epsilon=None)
    for eps in epsilons:
        config = variant(base, **{"federation.privacy.epsilon": None if math.isinf(eps) else eps})
        banks, report = replay.federated(config, factories)
        spec = config.privacy_spec()
        rows += _row(f"federated, ε={eps:g}", replay.score(config, banks), method="federated",
                     epsilon=eps, delta=base.federation.privacy.delta, sigma=spec.sigma if spec else 0.0,
                     clip_norm=base.model.transform.clip_norm, bytes_sent=report["bytes_sent"])
        print(f"ε={eps:g}: done")
    return rows


def sweep_encoding(base: ExperimentConfig, replay: Replay, encodings=ENCODINGS) -> list[dict[str, Any]]:
    factories = list(range(base.federation.num_factories))
    plain = variant(base, **{"model.transform": TransformConfig(), "federation.privacy.epsilon": None})
    rows = _row("centralized", replay.score(plain, replay.centralized(plain, list(factories))),
                method="centralized")
    full = embedding_dim(base.model)
    skipped = [dim for _, dim in encodings if dim is not None and dim >= full]
    if skipped:
        print(f"projections to {skipped} dims skipped: not below the embedding size ({full})")
    for dtype, dim in (e for e in encodings if e[1] not in skipped):
        transform = base.model.transform.model_copy(update={"projection_dim": dim, "projection_seed": base.seed})
        config = variant(plain, **{"federation.payload_dtype": dtype, "model.transform": transform})
        banks, report = replay.federated(config, factories)
        label = dtype + (f" + projection {dim}" if dim else "")
        ratio = {c: report["bytes_sent"][c] / report["raw_feature_bytes"][c] for c in report["bytes_sent"]}
        rows += _row(label, replay.score(config, banks), method="federated", encoding=dtype,
                     projection_dim=dim, bytes_sent=report["bytes_sent"], upload_ratio=ratio)
        print(f"{label}: done")
    return rows


def sweep_poisoning(base: ExperimentConfig, replay: Replay, modes=POISON_MODES) -> list[dict[str, Any]]:
    k = base.federation.num_factories
    poisoner = k - 1
    honest = {i: i for i in range(k)}
    rows = []
    for attack, fault in (("clean", None), ("defect features", "defects"), ("noise", "noise")):
        for mode in (("off",) if attack == "clean" else modes):
            config = variant(base, **{"federation.poison_mode": mode if attack != "clean" else "flag"})
            banks, report = replay.federated(config, list(honest), fault)
            flagged = report["flagged"]
            rows += _row(f"{attack}, screen {config.federation.poison_mode}", replay.score(config, banks),
                         method="federated", attack=attack, poison_mode=config.federation.poison_mode,
                         flagged=" ".join(flagged) or "none",
                         poisoner_flagged=factory_name(poisoner) in flagged,
                         z_poisoner=_z(report, poisoner))
            print(f"{attack} / {mode}: flagged {flagged or 'none'}")
    rows += _row("honest factories only", replay.score(base, replay.federated(base, list(range(k - 1)))[0]),
                 method="federated", attack="none (poisoner absent)")
    return rows


def sweep_ratio(base: ExperimentConfig, replay: Replay, factors=LOCAL_FACTORS) -> list[dict[str, Any]]:
    """Federated banks with local_ratio = factor x global_ratio beside the centralized bank of the
    same size (global_ratio of all patches): AUROC, coverage radius over every training patch
    (what the greedy k-center minimises) and bytes uploaded. With factor 1 the factories' coresets
    already fill the global budget, so the server keeps their union and selects nothing."""
    factories = list(range(base.federation.num_factories))
    g = base.federation.global_ratio
    central = replay.centralized(base, factories)
    rows = _row("centralized", replay.score(base, central), method="centralized", local_factor=None,
                bank_size={c: len(b) for c, b in central.items()}, coverage_radius=replay.coverage(base, central))
    for factor in factors:
        config = variant(base, **{"federation.local_ratio": min(1.0, factor * g)})
        banks, report = replay.federated(config, factories)
        rows += _row(f"federated, local {factor:g}x global", replay.score(config, banks), method="federated",
                     local_factor=factor, local_ratio=config.federation.local_ratio,
                     bank_size={c: len(b) for c, b in banks.items()},
                     coverage_radius=replay.coverage(config, banks), bytes_sent=report["bytes_sent"])
        print(f"local ratio {config.federation.local_ratio:g}: done")
    return rows


def _z(report: dict[str, Any], factory: int) -> float | None:
    zs = [c["z"].get(str(factory), c["z"].get(factory)) for c in report["poisoning"].values() if c.get("z")]
    zs = [z for z in zs if z is not None]
    return float(max(zs)) if zs else None


def write_outputs(out: Path, kind: str, rows: list[dict[str, Any]], base: ExperimentConfig) -> list[Path]:
    from experiments.app import plots

    write_table(out / "sweep.csv", rows)
    write_json(out / "sweep.json", {"kind": kind, "rows": rows})
    figures = []
    categories = sorted({r["category"] for r in rows})
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    for metric in ("image_auroc", "pixel_auroc"):
        series = {c: [next((r[metric] for r in rows if r["variant"] == v and r["category"] == c), np.nan)
                      for v in labels] for c in categories}
        values = [x for s in series.values() for x in s if x is not None and np.isfinite(x)]
        low = max(0.0, np.floor((min(values, default=0.5) - 0.02) * 20) / 20)
        figures.append(plots.grouped_bars(labels, series, out / f"{metric}.png", metric.replace("_", " "),
                                          f"{kind} sweep: {metric.replace('_', ' ')}", ylim=(low, 1.01)))
    if kind == "privacy":
        figures.append(plots.privacy_curve(rows, out / "auroc_vs_epsilon.png"))
    if kind == "encoding":
        figures.append(plots.auroc_vs_bytes(rows, out / "auroc_vs_bytes.png"))
    first = ["variant", "category", "image_auroc", "pixel_auroc", "aupro"]
    columns = first[:1] + first[2:] + [c for c in dict.fromkeys(k for r in rows for k in r)
                                       if c not in first and c != "method"]
    lines = [f"# fedpatch {kind} sweep\n",
             f"Config: {base.data.format} {', '.join(categories)}; {base.federation.num_factories} factories "
             f"({base.federation.partition}); backbone {base.model.backbone.name}; seed {base.seed}.\n",
             _markdown(rows, ["category", *columns]), ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in figures]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    return figures


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            if math.isinf(v):
                return "∞"
            return f"{v:.4f}" if 1e-3 <= abs(v) < 10 or v == 0 else f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def run_sweep(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if args.kind not in KINDS:
        raise ConfigError(f"sweep kind {args.kind!r} is unknown; valid: {', '.join(KINDS)}")
    base = load_config(args.config, ExperimentConfig, overrides)
    plan = plan_factories(base)
    poisoner = base.federation.num_factories - 1 if args.kind == "poisoning" else None
    if args.kind == "poisoning" and base.federation.num_factories < 3:
        raise ConfigError("the poisoning sweep needs federation.num_factories >= 3 (the screen compares factories)")
    out = new_run_dir(base.output_dir, f"sweep-{args.kind}", args.out)
    manifest = Manifest(out, base, f"sweep-{args.kind}")
    manifest.write(status="running")
    own_cache = not base.data.cache_dir  # a cache for this sweep only, removed at the end
    if own_cache:
        base = variant(base, **{"data.cache_dir": str(out / "features")})
    bare = variant(base, **{"model.transform": TransformConfig(), "federation.privacy.epsilon": None})
    raw = PatchCore(bare.model, device=base.device, seed=base.seed)  # raw embeddings: transforms per variant
    start = time.time()
    data = extract(base, plan, raw, poisoner, not args.quiet)
    manifest.time("extract", time.time() - start)
    replay = Replay(base, data, not args.quiet, plan, out, keep_banks=getattr(args, "keep_banks", False))
    start = time.time()
    if args.kind == "privacy":
        epsilons = tuple(float(e) for e in args.epsilons) if args.epsilons else EPSILONS
        rows = sweep_privacy(base, replay, epsilons)
        manifest.data["privacy"] = [variant(base, **{"federation.privacy.epsilon": e}).privacy_spec().to_dict()
                                    for e in epsilons if not math.isinf(e)]
    elif args.kind == "encoding":
        rows = sweep_encoding(base, replay)
    elif args.kind == "ratio":
        rows = sweep_ratio(base, replay)
    else:
        rows = sweep_poisoning(base, replay)
    manifest.time("variants", time.time() - start)
    if own_cache:
        shutil.rmtree(out / "features", ignore_errors=True)
    write_outputs(out, args.kind, rows, base)
    manifest.write(status="complete", rows=len(rows))
    columns = [c for c in ("variant", "category", "image_auroc", "pixel_auroc", "aupro", "bank_size", "coverage_radius",
                           "bytes_sent", "sigma", "flagged") if any(c in r for r in rows)]
    print(format_table(rows, columns))
    print(f"\nreport: {out / 'report.md'}")
    return 0
