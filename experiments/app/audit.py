"""`fedpatch audit --config C`: what a curious server learns from one factory's upload, measured.

For each category of the config, one factory (`--factory`, default factory-0) is the victim. Every
payload setting (federated/audit/releases.py: the config as given, fp32, fp16, int8, shared
projections, clipping, clip + DP noise per vector at several epsilons, PaDiM's statistics,
DP-PaDiM per image at several epsilons) is built through the site's own code path and decoded as
the server decodes it; then three attacks run on it:

- inversion: decoders (ridge, MLP) trained on the attacker's own images (another product of the
  config, the other factories' images of the same product, and/or the synthetic factories; never
  the victim's) from an embedding to the pixel window under it, applied to the released vectors;
  PSNR/SSIM against the true windows, and against the attacker's mean window (a decoder that
  learnt nothing);
- membership: the victim's training images against as many unseen normal images of the same
  product, seen through the victim's camera (its test-good and held-out images, then other
  factories' training images); AUROC with a bootstrap 95% interval, TPR at 1% FPR;
- attribution: a logistic regression from a released vector to the factory that sent it (every
  factory's release under the same setting), accuracy against chance 1/K.

And what each release is for: the image AUROC of the union test set (through the victim's
camera) scored with the release alone as the model (PatchCore's max patch distance to the
released vectors; PaDiM's max Mahalanobis distance), so protection and utility sit side by side.

Writes report.md (tables, picture grids), inversion.csv, membership.csv, attribution.csv,
releases.csv, figures/*.png, config.yaml and manifest.json into a fresh run folder.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.app.reports import format_table, write_table
from experiments.app.runs import Manifest, new_run_dir, write_config, write_json
from federated.audit.attacks import attribution_attack, fit_mlp, fit_ridge, inversion_scores, patch_windows
from federated.audit.measures import auroc, auroc_ci, tpr_at_fpr
from federated.audit.releases import FactoryData, Release, Setting, build_release, default_settings
from federated.config import ExperimentConfig
from federated.plan import FactoryPlan, plan_factories
from patchcore.config import TransformConfig, load_config, replace
from patchcore.data.records import ImageRecord
from patchcore.data.sources import data_root, load_records
from patchcore.errors import ConfigError, DataError
from patchcore.evaluation import loader_for
from patchcore.metrics import image_auroc
from patchcore.model import PatchCore
from patchcore.progress import track

ATTACKERS = ("other-product", "same-product", "synthetic")
DECODERS = ("ridge", "mlp")
FAMILIES = ("config", "fp32", "fp16", "int8", "projection", "clip", "dp", "padim", "dp_padim")
GRID_PATCHES = 12  # patches per row of the picture grids
SYNTHETIC_SEED_OFFSET = 7919  # the attacker's synthetic images: another seed than any synthetic victim's


@dataclass
class Embedded:
    raw: torch.Tensor  # (N, L, D) before model.transform
    images: np.ndarray  # (N, H, W, 3) uint8
    grid: tuple[int, int]


class Embedder:
    """Raw embeddings (before model.transform) and model-input pixels of records, in one pass
    over the same loader a site uses; each (image, shift) is embedded once per audit."""

    def __init__(self, model: PatchCore, config: ExperimentConfig, shifts: dict, progress: bool) -> None:
        self.model, self.config, self.shifts, self.progress = model, config, shifts, progress
        self.memo: dict[tuple[str, str], tuple[torch.Tensor, np.ndarray]] = {}
        self.grid: tuple[int, int] | None = None

    def __call__(self, records: list[ImageRecord], desc: str, config: ExperimentConfig | None = None) -> Embedded:
        keys = [(str(r.path), str(r.domain)) for r in records]
        todo = list({k: r for k, r in zip(keys, records) if k not in self.memo}.items())
        if todo:
            done = 0
            for batch in track(loader_for([r for _, r in todo], config or self.config, self.shifts), desc,
                               self.progress):
                emb, grid = self.model.embed_raw(batch["image"])  # (B, L, D)
                self.grid = tuple(grid)
                pixels = (batch["image"].permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                for row, image in zip(emb.cpu(), pixels):
                    self.memo[todo[done][0]] = (row.clone(), image)
                    done += 1
        found = [self.memo[k] for k in keys]
        return Embedded(torch.stack([f[0] for f in found]), np.stack([f[1] for f in found]), self.grid)


def _records(plan: FactoryPlan, category: str, factory: int, split: str) -> list[ImageRecord]:
    return [r for r in getattr(plan.shards[factory], split) if r.category == category]


def synthetic_records(config: ExperimentConfig, images: int) -> tuple[list[ImageRecord], ExperimentConfig]:
    """The synthetic factories' good training images at the config's resolution (the attacker's
    own, generated offline with a seed of their own, so never a synthetic victim's images), and
    a config that loads them."""
    side = config.data.resize if isinstance(config.data.resize, int) else max(config.data.resize)
    synth = replace(config.data.synthetic, size=int(side), n_train=int(images), n_test_good=1,
                    n_test_defect=1, categories=("stripes", "disc"))
    data = replace(config.data, format="synthetic", root="", categories=(), synthetic=synth)
    cfg = config.model_copy(update={"data": data})
    root = data_root(data, config.seed + SYNTHETIC_SEED_OFFSET)
    records = [r for c in synth.categories for r in load_records(data, root, c) if r.split == "train"]
    return records, cfg


def clip_norm_for(attacker: list[torch.Tensor], quantile: float = 0.9) -> float:
    """A clip radius fixed without the victim's data: this quantile of the L2 norms of the
    attacker's own (public) embeddings, every source pooled."""
    norms = torch.cat([torch.linalg.vector_norm(a.reshape(-1, a.shape[-1]), dim=1) for a in attacker])
    return float(np.quantile(norms.numpy(), quantile))


def check_options(args: argparse.Namespace, config: ExperimentConfig) -> None:
    """Refuse bad options in one line, before any image is read."""
    unknown = set(args.settings or ()) - set(FAMILIES)
    if unknown:
        raise ConfigError(f"--settings: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAMILIES)}")
    if args.window < 1:
        raise ConfigError(f"--window must be >= 1 pixel, got {args.window}")
    if not 0 <= args.factory < config.federation.num_factories:
        raise ConfigError(f"--factory must be in [0, {config.federation.num_factories - 1}] "
                          f"(federation.num_factories), got {args.factory}")
    bad = [e for e in list(args.epsilons) + list(args.image_epsilons) if not e > 0]
    if bad:
        raise ConfigError(f"--epsilons and --image-epsilons must be > 0, got {bad[0]}")


def _settings(args: argparse.Namespace, config: ExperimentConfig, dim: int, clip: float,
              public: torch.Tensor, grid: tuple[int, int]) -> list[Setting]:
    families = set(args.settings or FAMILIES)
    every = default_settings(config, dim, clip, tuple(args.epsilons), tuple(args.projections), padim=True)
    if "dp_padim" in families and args.image_epsilons:
        every += dp_padim_settings(config, public, grid, args.image_epsilons)
    return [s for s in every if s.family in families]


def dp_padim_settings(config: ExperimentConfig, public: torch.Tensor, grid: tuple[int, int],
                      epsilons: list[float], max_images: int = 100) -> list[Setting]:
    """DP-PaDiM at each per-image epsilon (its default shape: image centring, one pooled
    covariance, 4x4 scale blocks), clip radii measured on public images (the attacker's own,
    at most `max_images`), as federated/dp_padim.py requires."""
    from dataclasses import replace as dc_replace

    from federated.dp_padim import DpPadimSpec, public_clips

    rng = np.random.default_rng(config.seed)
    keep = torch.as_tensor(np.sort(rng.choice(len(public), min(max_images, len(public)), replace=False)))
    base = DpPadimSpec(epsilon=float("inf"), delta=config.federation.privacy.delta, seed=config.seed)
    clips = public_clips(public[keep], grid, base)
    return [Setting(f"DP-PaDiM eps={e:g} per image", kind="dp_padim", family="dp_padim",
                    params=(("spec", dc_replace(base, epsilon=float(e), clips=clips)),)) for e in epsilons]


class Attackers:
    """The attacker's training pairs (raw embedding rows, pixel windows) per source, and its
    fitted decoders, memoised per (source, decoder, release space, noise)."""

    def __init__(self, sources: dict[str, Embedded], window: int, max_rows: int, seed: int,
                 mlp_epochs: int, mlp_seconds: float) -> None:
        self.data: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
        rng = np.random.default_rng(seed)
        for name, emb in sources.items():
            n, length, dim = emb.raw.shape
            rows = np.sort(rng.choice(n * length, min(max_rows, n * length), replace=False))
            windows = patch_windows(emb.images, emb.grid, window, rows)
            self.data[name] = (emb.raw.reshape(-1, dim)[torch.as_tensor(rows)], windows, rows // length)
        self.seed, self.mlp_epochs, self.mlp_seconds = seed, mlp_epochs, mlp_seconds
        self.decoders: dict[tuple, Any] = {}
        self.mean = {name: w.mean(axis=0) for name, (_, w, _) in self.data.items()}

    def decoder(self, source: str, kind: str, release: Release, key: tuple) -> Any:
        full = (source, kind, *key)
        if full not in self.decoders:
            rows, windows, groups = self.data[source]
            x = release.space(rows).numpy()
            y = windows.reshape(len(windows), -1)
            if kind == "ridge":
                self.decoders[full] = fit_ridge(x, y, release.noise_sigma, seed=self.seed, groups=groups)
            else:
                self.decoders[full] = fit_mlp(x, y, release.noise_sigma, seed=self.seed,
                                              max_epochs=self.mlp_epochs, time_limit_s=self.mlp_seconds)
        return self.decoders[full]


def _space_key(setting: Setting, cfg: ExperimentConfig, release: Release) -> tuple:
    return (setting.kind, repr(cfg.model.transform), round(release.noise_sigma, 9))


def _membership_candidates(plan: FactoryPlan, category: str, victim: int, embed: Embedder,
                           members: Embedded, limit: int, seed: int) -> tuple[Embedded, Embedded, dict]:
    """(members, non-members) of equal size: the victim's training images and unseen normal
    images of the same product through the victim's camera (its own test-good and held-out
    images first, then the other factories' training images)."""
    name = plan.shards[victim].name
    own = [r for r in _records(plan, category, victim, "test") + _records(plan, category, victim, "validation")
           if r.label == 0]
    others = [r.with_domain(name) for k in range(len(plan.shards)) if k != victim
              for r in _records(plan, category, k, "train")]
    pool = own + others
    n = min(len(members.raw), len(pool), limit)
    if n < 2:
        raise DataError(f"{category}: membership needs at least 2 unseen normal images, found {len(pool)}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(members.raw), n, replace=False))
    chosen = own[:n] if len(own) >= n else own + [others[i] for i in np.sort(
        rng.choice(len(others), n - len(own), replace=False))]
    unseen = embed(chosen, f"{name} {category} unseen")
    picked = Embedded(members.raw[torch.as_tensor(keep)], members.images[keep], members.grid)
    return picked, unseen, {"members": n, "nonmembers": n,
                            "nonmember_sources": {"own test-good / held-out": min(len(own), n),
                                                  "other factories' training": max(0, n - len(own))}}


def audit_category(args: argparse.Namespace, config: ExperimentConfig, plan: FactoryPlan,
                   category: str, embed: Embedder, out: Path) -> dict[str, list[dict[str, Any]]]:
    victim_id = args.factory
    factories: dict[int, FactoryData] = {}
    for k, shard in enumerate(plan.shards):
        records = _records(plan, category, k, "train")
        if records:
            e = embed(records, f"{shard.name} {category}")
            factories[k] = FactoryData(k, shard.name, category, e.raw, e.images, e.grid)
    if victim_id not in factories:
        raise DataError(f"{category}: factory-{victim_id} has no training images of it (the victim must)")
    victim = factories[victim_id]
    members, unseen, candidates = _membership_candidates(
        plan, category, victim_id, embed, Embedded(victim.raw, victim.images, victim.grid),
        args.max_candidates, config.seed)

    tests = [r.with_domain(victim.name) for k in range(len(plan.shards)) for r in _records(plan, category, k, "test")]
    test = embed(tests, f"{victim.name} {category} test images")
    labels = np.array([r.label for r in tests])
    sources: dict[str, Embedded] = {}
    for source in args.attacker:
        if source == "other-product":
            others = [r.with_domain(None) for c in plan.categories if c != category
                      for s in plan.shards for r in s.train if r.category == c]
            if others:
                sources[source] = embed(others, f"attacker: other products than {category}")
        elif source == "same-product":
            same = [r.with_domain(None) for k in range(len(plan.shards)) if k != victim_id
                    for r in _records(plan, category, k, "train")]
            if same:
                sources[source] = embed(same, f"attacker: other {category} images")
        elif source == "synthetic":
            records, synth = synthetic_records(config, args.synthetic_images)
            sources[source] = embed(records, "attacker: synthetic factories", config=synth)
    if not sources:
        raise DataError(f"{category}: no attacker images (--attacker {' '.join(args.attacker)}): a config with one "
                        "category has no other product; add synthetic")
    clip = args.clip_norm or config.model.transform.clip_norm or clip_norm_for([e.raw for e in sources.values()])
    settings = _settings(args, config, victim.dim, clip, torch.cat([e.raw for e in sources.values()]), victim.grid)
    attackers = Attackers(sources, args.window, args.max_attacker_rows, config.seed, args.mlp_epochs,
                          args.mlp_seconds)

    rows: dict[str, list[dict[str, Any]]] = {"inversion": [], "membership": [], "attribution": [], "releases": []}
    shown: list[dict[str, Any]] = []  # per setting: the best decoder's output, for the picture grid
    mosaics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for setting in settings:
        start = time.perf_counter()
        cfg = setting.config(config)
        release = build_release(setting.kind, cfg, victim, setting)
        base = {"category": category, "setting": setting.name}
        default_noise = f"σ {release.noise_sigma:.4g} per coordinate" if release.noise_sigma else "none"
        rows["releases"].append({**base, "kind": release.kind, "vectors": len(release.vectors),
                                 "dim": int(release.vectors.shape[1]), "bytes": release.bytes_sent,
                                 "noise_sigma": release.noise_sigma,
                                 "noise": release.details.get("noise", default_noise),
                                 "encoding": release.details.get("encoding", ""),
                                 "detection_auroc": image_auroc(labels, release.anomaly(test.raw))})
        if len(release.vectors):  # a release of no per-patch or per-position vectors has nothing to invert
            true = release.targets(victim, args.window)
            best: dict[str, Any] | None = None
            for source in sources:
                for kind in args.decoder:
                    decoder = attackers.decoder(source, kind, release, _space_key(setting, cfg, release))
                    decoded = np.clip(decoder(release.vectors), 0, 1).reshape(true.shape)
                    s = inversion_scores(decoded, true, attackers.mean[source].reshape(true.shape[1:]))
                    row = {**base, "attacker": source, "decoder": kind, "vectors": len(true),
                           "psnr": float(s["psnr"].mean()), "psnr_median": float(np.median(s["psnr"])),
                           "psnr_baseline": float(s["psnr_baseline"].mean()),
                           "gain_db": float(s["psnr"].mean() - s["psnr_baseline"].mean()),
                           "ssim": float(s["ssim"].mean()) if "ssim" in s else None,
                           "ssim_baseline": float(s["ssim_baseline"].mean()) if "ssim" in s else None,
                           "noise_sigma": release.noise_sigma, "epochs": getattr(decoder, "epochs", None)}
                    rows["inversion"].append(row)
                    if best is None or row["psnr"] > best["psnr"]:
                        best = {**row, "decoded": decoded}
            ids = release.rows if release.rows is not None else release.positions
            shown.append({"setting": setting.name, "by": f"{best['attacker']}, {best['decoder']}", "ids": ids,
                          "aggregate": release.rows is None, "true": true, "decoded": best["decoded"]})
            if release.rows is not None:
                mosaics[setting.name] = (release.rows, best["decoded"])
        pos, neg = release.membership(members.raw), release.membership(unseen.raw)
        for stat in pos:
            low, high = auroc_ci(pos[stat], neg[stat], seed=config.seed)
            rows["membership"].append({**base, "statistic": stat, "members": len(pos[stat]),
                                       "nonmembers": len(neg[stat]), "auroc": auroc(pos[stat], neg[stat]),
                                       "auroc_ci_low": low, "auroc_ci_high": high,
                                       "tpr_at_1pct_fpr": tpr_at_fpr(pos[stat], neg[stat], 0.01)})
        if len(factories) >= 2 and release.rows is not None:
            every = [release if k == victim_id else build_release(setting.kind, cfg, f, setting)
                     for k, f in sorted(factories.items())]
            length = victim.grid[0] * victim.grid[1]
            result = attribution_attack([r.vectors for r in every], [r.rows // length for r in every],
                                        seed=config.seed)
            rows["attribution"].append({**base, **result, "domain_shift": config.federation.domain_shift})
        if not args.quiet:
            inv = [r for r in rows["inversion"] if r["setting"] == setting.name]
            mem = next(r for r in rows["membership"] if r["setting"] == setting.name)
            best_inv = max(inv, key=lambda r: r["gain_db"]) if inv else None
            said = (f"inversion {best_inv['gain_db']:+.1f} dB over the mean patch ({best_inv['attacker']}, "
                    f"{best_inv['decoder']})" if best_inv else "nothing to invert")
            print(f"{category} / {setting.name}: {said}; membership AUROC {mem['auroc']:.3f}; detection AUROC "
                  f"{rows['releases'][-1]['detection_auroc']:.3f} ({time.perf_counter() - start:.1f} s)")
    figures = out / "figures"
    from experiments.app.audit_figures import inversion_grid, mosaic

    grid_path = inversion_grid(shown, figures / f"inversion_{category}.png", GRID_PATCHES, config.seed,
                               title=f"{category}, {victim.name}: true windows and what the server decodes "
                                     f"(each setting's best attacker and decoder)")
    mosaic_path = mosaic(victim, mosaics, args.window, figures / f"mosaic_{category}.png")
    return {**rows, "figures": [grid_path, mosaic_path], "meta": {
        "category": category, "victim": victim.name, "victim_images": victim.num_images,
        "clip_norm": clip, "attackers": {s: int(e.raw.shape[0]) for s, e in sources.items()},
        "test_images": {"good": int((labels == 0).sum()), "defective": int((labels == 1).sum())},
        "candidates": candidates, "grid": list(victim.grid), "factories": len(factories)}}


def run_audit(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    config = load_config(args.config, ExperimentConfig, overrides)
    check_options(args, config)
    plan = plan_factories(config)
    model = PatchCore(config.model.model_copy(update={"transform": TransformConfig()}),
                      device=config.device, seed=config.seed)  # raw embeddings: each setting transforms them
    run_dir = new_run_dir(config.output_dir, "audit", args.out)
    write_config(run_dir, config)
    manifest = Manifest(run_dir, config, "audit")
    manifest.write(status="running", victim=f"factory-{args.factory}", window=args.window,
                   attackers=list(args.attacker), decoders=list(args.decoder))
    embed = Embedder(model, config, plan.shifts, progress=not args.quiet)
    tables: dict[str, list[dict[str, Any]]] = {"inversion": [], "membership": [], "attribution": [], "releases": []}
    metas, figures = [], []
    for category in plan.categories:
        start = time.time()
        result = audit_category(args, config, plan, category, embed, run_dir)
        for key in tables:
            tables[key] += result[key]
        metas.append(result["meta"])
        figures += result["figures"]
        manifest.time(f"audit.{category}", time.time() - start)
    for key, table in tables.items():
        if table:
            write_table(run_dir / f"{key}.csv", table)
    from experiments.app.audit_figures import write_report

    write_report(run_dir / "report.md", config, args, tables, metas, figures)
    write_json(run_dir / "audit.json", {"categories": metas, **tables})
    manifest.write(status="complete", categories=metas)
    if not args.quiet:
        print(format_table(tables["membership"], ("category", "setting", "statistic", "auroc", "tpr_at_1pct_fpr")))
    print(f"audit folder: {run_dir}")
    return 0
