"""`fedpatch study dp_padim`: a PaDiM-style model with (ε, δ)-DP per training IMAGE, beside the
non-private PaDiM and PatchCore, federated and centralized.

DP-PaDiM (federated/dp_padim.py): every factory image-centres its embeddings (each image minus its
own mean embedding; test images the same), keeps a data-independent random 100 of the channels,
and releases, per image clipped as a whole and summed with Gaussian noise: one pooled
second-moment matrix (100 x 100) and one mean squared norm per 4 x 4 block of positions (49
blocks); no count (without a mean it rescales every score alike). The server adds the four
factories' releases and post-processes: the covariance with its eigenvalues floored at the known
noise level, per-block variance ratios shrunk toward their mean by their known noise, Mahalanobis
distance divided by the block's ratio. Each
factory's release is accounted with Gaussian DP (exact composition of its parts) at δ = 1e-5;
its guarantee is per training image of that factory, whatever the others send. The clip radii
are the medians of the per-image norms on PUBLIC images, AutoVI's engine_wiring training set
through the same backbone (never the factories' images). The seed draws the partition, the
channel subset and the noise. "centralized" = one factory holding every image (less noise in
total: one noise draw instead of four; at ε = ∞ it is the federated model). Trade-offs at ε = 8
(federated, each beside its own ε = ∞ ceiling) change one setting each; image AUROC only.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from experiments.research.replay import Replay, TestSet
from experiments.research.study.common import both
from experiments.research.study.core import Study, train_images
from experiments.research.study.padim import run_padim
from experiments.research.study.report import Table, verdict, write_report
from federated.dp_padim import DpPadimSpec, fit_federated, public_clips
from patchcore.data.autovi import load_autovi
from patchcore.errors import ConfigError
from patchcore.evaluation import ScoredSet, loader_for

TITLE = "DP-PaDiM: (ε, δ)-DP per training image"
EPSILONS = (1.0, 4.0, 8.0, math.inf)
DELTA = 1e-5
BASE = DpPadimSpec(epsilon=math.inf, delta=DELTA)  # dims 100, image centring, pooled cov, 4 x 4 scale blocks
PUBLIC = ("autovi", "engine_wiring")
# one setting changed at a time, at ε = 8, federated
VARIANTS: dict[str, dict[str, Any]] = {
    "no scale blocks": {"scale_block": None},
    "scale blocks 7 x 7": {"scale_block": 7},
    "20 channels": {"dims": 20},
    "50 channels": {"dims": 50},
    "mean per 14 x 14 block": {"mean_block": 14},
    "floor 0.5": {"floor": 0.5},
    "as first suggested: per-position means, no centring, no scale blocks": {
        "centre": "none", "mean_block": 1, "scale_block": None},
}
TRADE_EPS = 8.0


def eps_label(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def method(e: float, where: str) -> str:
    return f"DP-PaDiM ε={eps_label(e)} {where}"


def public_embeddings(study: Study) -> tuple[torch.Tensor | None, str]:
    """The public images' (N, L, D) embeddings: AutoVI engine_wiring's training images beside the
    data root, through the study's backbone (and feature cache). Without them (synthetic smoke
    configs) the other categories' training images stand in, and the source says so."""
    root = Path(study.config.data.root or ".").resolve().parent / PUBLIC[0]
    if (root / PUBLIC[1]).is_dir():
        config = study.config_for(study.seeds[0])
        records = load_autovi(root, PUBLIC[1], splits=("train",))
        model = study.model(config)
        model.cache = study.cache
        feats = model.extract(loader_for(records, config), study.progress, desc=f"public {PUBLIC[1]}").cpu()
        source = f"public: {PUBLIC[0]}/{PUBLIC[1]} train ({len(records)} images)"
        return feats.reshape(len(records), -1, feats.shape[-1]), source
    return None, "STAND-IN (no AutoVI beside the data root): the other categories' training images; not a DP choice"


def scored(model, test: TestSet, pixels: bool = True) -> ScoredSet:
    """Scores of `test`; pixels=False: image metrics only (the trade-off runs; saves the maps' cost)."""
    if not pixels:
        patch = model.patch_scores(test.emb).flatten(1).max(dim=1).values.numpy()
        return ScoredSet(test.records, patch, test.masks[:, :1, :1].astype("float32"), test.masks[:, :1, :1],
                         test.has_mask & False)
    scores, maps = model.score_embeddings(test.emb, test.size)
    return ScoredSet(test.records, scores.numpy(), maps.numpy(), test.masks, test.has_mask)


def run_dp(study: Study, replay: Replay, seed: int, public: torch.Tensor | None) -> tuple[list[dict], list[dict]]:
    """Every DP-PaDiM run of one seed; returns (ledger rows, clipping rows)."""
    data, c = replay.data, "same images"
    ledgers, clipping = [], []
    radii: dict[str, Any] = {}  # clip radii per model shape: the public images are the same for every category
    for category, test in data.test.items():
        grid = test.grid
        factories = sorted({k for (k, cc) in data.train if cc == category and k >= 0})
        sites = [train_images(data, category, [k]) for k in factories]
        if public is None:  # smoke stand-in: the other categories
            others = [train_images(data, o) for o in data.test if o != category]
            pub = torch.cat(others) if others else sites[0]
        else:
            pub = public
        base = replace(BASE, seed=seed)
        clips = public_clips(pub, grid, base)

        def fit(e: float, where: str, **change: Any):
            shape = replace(base, **change)  # ε = inf: the clip radii depend on the shape alone
            key = repr((shape, id(pub)))
            if key not in radii:
                radii[key] = public_clips(pub, grid, shape)
            spec = replace(shape, epsilon=e, clips=radii[key])
            parts = sites if where == "federated" else [torch.cat(sites)]
            return fit_federated(parts, grid, spec, noise_seed=seed, config=replay.config.model)

        for e in EPSILONS:
            for where in ("federated", "centralized") if math.isfinite(e) else ("federated",):
                model, releases = fit(e, where)  # at ε = ∞ both sum to the same statistics
                study.results.add(c, method(e, where), seed, category, scored(model, test),
                                  epsilon=e if math.isfinite(e) else None, factories=len(releases))
                if where == "federated" and seed == study.seeds[0] and math.isfinite(e):
                    for p in releases[0].ledger.parts:
                        ledgers.append({"category": category, "epsilon": e, "part": p.name,
                                        "sensitivity": p.sensitivity, "sigma": p.sigma, "mu": p.mu,
                                        "factory_mu": releases[0].ledger.mu,
                                        "factory_epsilon": releases[0].ledger.epsilon(DELTA)})
                if where == "federated" and math.isfinite(e) and e == TRADE_EPS:
                    clipping.append({"category": category, "seed": seed, "clip_second": clips.second,
                                     "clip_scale": clips.scale,
                                     **{f"clipped_{k}": sum(r.clipped.get(k, 0.0) for r in releases) / len(releases)
                                        for k in ("second", "scale")}})
        for name, change in VARIANTS.items():
            model, _ = fit(TRADE_EPS, "federated", **change)
            study.results.add(c, f"{method(TRADE_EPS, 'federated')}, {name}", seed, category,
                              scored(model, test, pixels=False))
            model, _ = fit(math.inf, "federated", **change)
            study.results.add(c, f"{method(math.inf, 'federated')}, {name}", seed, category,
                              scored(model, test, pixels=False))
    return ledgers, clipping


def run(study: Study) -> None:
    ledgers, clipping = [], []
    public, source = public_embeddings(study)  # the same for every seed (the channel subset comes later)
    for seed in study.seeds:
        replay = study.replay(seed)
        both(study, replay, "same images", seed, coverage=False)
        run_padim(study, replay, "same images", seed)
        led, clip = run_dp(study, replay, seed, public)
        ledgers += led
        clipping += clip
        study.say(f"seed {seed}: done")
    c = "same images"
    pairs = [(f"{method(e, 'federated')} − PatchCore federated", (c, method(e, "federated")), (c, "federated"))
             for e in EPSILONS]
    pairs += [(f"{method(e, 'centralized')} − PatchCore federated", (c, method(e, "centralized")), (c, "federated"))
              for e in EPSILONS if math.isfinite(e)]
    pairs += [("PaDiM federated − PatchCore federated", (c, "PaDiM federated"), (c, "federated")),
              (f"{method(TRADE_EPS, 'federated')} − {method(math.inf, 'federated')}",
               (c, method(TRADE_EPS, "federated")), (c, method(math.inf, "federated")))]
    diffs = study.results.difference_rows(pairs)
    findings = []
    for d in diffs:
        a, b = d["a"].split(" / ")[1], d["b"].split(" / ")[1]
        line = verdict(d, a, b)
        if b == "federated" and a.startswith("DP-PaDiM"):
            line += "; target (within 0.02 of PatchCore federated) " + ("met" if d["diff"] >= -0.02 else
                                                                         f"missed by {-0.02 - d['diff']:.3f}")
        findings.append(line)
    findings.append(f"Clip radii: {source}.")
    tables = [Table("ledger", f"Privacy ledger of one factory (seed {study.seeds[0]}; δ = {DELTA:g}; "
                    "sensitivity for adding/removing one image)", ledgers,
                    ["category", "epsilon", "part", "sensitivity", "sigma", "mu", "factory_mu", "factory_epsilon"]),
              Table("clipping", "Clip radii (public) and the share of each factory's images clipped", clipping,
                    ["category", "seed", "clip_second", "clip_scale", "clipped_second", "clipped_scale"])]
    if not study.results.runs:
        raise ConfigError("dp_padim study produced no runs")
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, tables)

