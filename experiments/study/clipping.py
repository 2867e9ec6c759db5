"""`fedpatch study clipping`: clipping patch embeddings to a norm, PatchCore and PaDiM.

`model.transform.clip_norm` scales every patch embedding longer than the radius back onto it
(bank vectors and queries alike; privacy needs it to bound what one vector can reveal). One
seed of tire once showed a large gain from it. Here the radius is a quantile of the training
patch norms (pooled over the config's categories, per seed: 50%, 90%, 99%, and the maximum,
which clips nothing and so must equal no clipping: a built-in control), over seeds and
categories, for centralized and federated PatchCore and for PaDiM. Why it helps or hurts: the
diagnostics table gives, per category, the share of each test set's worst patches that are
longer than the radius (defective vs good images) and the image AUROC of the worst patch's
norm alone; clipping erases exactly the part of that signal that lies beyond the radius.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from experiments.replay import variant
from experiments.study.common import both
from experiments.study.core import Study
from experiments.study.padim import run_padim
from experiments.study.report import Table, verdict, write_report
from experiments.study.stats import auroc
from patchcore.config import TransformConfig
from patchcore.transform import clip_rows

QUANTILES = (0.5, 0.9, 0.99, 1.0)
NONE = "no clipping"
TITLE = "Clipping patch embeddings"


def quantiles(study: Study) -> tuple[float, ...]:
    levels = study.options.get("levels")
    return tuple(float(x) for x in levels) if levels else QUANTILES


def label(q: float) -> str:
    return "clip at max norm (control)" if q >= 1.0 else f"clip at q{q * 100:g}"


def radius(replay, q: float) -> float:
    norms = torch.cat([x.norm(dim=1) for (k, _), x in replay.data.train.items() if k >= 0])
    # the largest norm, nudged up, clips nothing; otherwise the quantile (torch.quantile caps its input size)
    if q >= 1.0:
        return float(norms.max()) * (1 + 1e-6)
    sample = norms[torch.randperm(len(norms), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return float(torch.quantile(sample.double(), q))


def diagnostics(replay, r: float, q: float, seed: int) -> list[dict[str, Any]]:
    rows = []
    for category, test in replay.data.test.items():
        norms = test.emb.norm(dim=2)  # (N, L)
        worst = norms.max(dim=1).values.numpy()
        labels = np.array([rec.label for rec in test.records])
        train = torch.cat([x for (k, c), x in replay.data.train.items() if c == category and k >= 0]).norm(dim=1)
        row = {"quantile": q, "category": category, "seed": seed, "radius": r,
               "train_patches_clipped": float((train > r).float().mean())}
        for value, kind in ((1, "defective"), (0, "good")):
            row[f"{kind}_worst_patch_clipped"] = float((worst[labels == value] > r).mean()) if (labels == value).any() else None
        row["auroc_of_max_norm"] = float(auroc(labels, worst)) if 0 < labels.sum() < len(labels) else None
        rows.append(row)
    return rows


def run(study: Study) -> None:
    diag: list[dict[str, Any]] = []
    grid = quantiles(study)
    for seed in study.seeds:
        replay = study.replay(seed)
        base = variant(replay.config, **{"model.transform": TransformConfig()})
        both(study, replay, NONE, seed, config=base, coverage=False)
        run_padim(study, replay, NONE, seed)
        for q in grid:
            r = radius(replay, q)
            config = variant(base, **{"model.transform": TransformConfig(clip_norm=r)})
            both(study, replay, label(q), seed, config=config, coverage=False)
            run_padim(study, replay, label(q), seed, transform=lambda x, r=r: _clip(x, r))
            diag += diagnostics(replay, r, q, seed)
        study.say(f"seed {seed}: done")
    pairs = [(f"{label(q)} − none, {m}", (label(q), m), (NONE, m))
             for q in grid for m in ("centralized", "federated", "PaDiM centralized")]
    diffs = study.results.difference_rows(pairs)
    findings = _findings(diffs)
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, [_diag_table(diag)])


def _clip(x: torch.Tensor, r: float) -> torch.Tensor:
    shape = x.shape
    return clip_rows(x.reshape(-1, shape[-1]), r)[0].reshape(shape)


def _findings(diffs: list[dict[str, Any]]) -> list[str]:
    out = []
    for method in ("centralized", "federated", "PaDiM centralized"):
        mine = [d for d in diffs if d["a"].split(" / ")[1] == method and "control" not in d["comparison"]]
        up = [d for d in mine if d["real"] and d["diff"] > 0]
        down = [d for d in mine if d["real"] and d["diff"] < 0]
        out.append(f"{method}: clipping gains beyond noise in {len(up)} of {len(mine)} (radius, category) cells"
                   + (" (" + ", ".join(f"{d['comparison'].split(' −')[0]} {d['category']} {d['diff']:+.3f}" for d in up) + ")"
                      if up else "")
                   + f", loses in {len(down)}"
                   + (" (" + ", ".join(f"{d['comparison'].split(' −')[0]} {d['category']} {d['diff']:+.3f}" for d in down) + ")"
                      if down else "") + ".")
    control = [d for d in diffs if "control" in d["comparison"]]
    if control:
        worst = max(abs(d["diff"]) for d in control)
        out.append(f"Control (radius above every norm): largest |difference| {worst:.4f}, as it must be ~0.")
    out += [verdict(d) for d in diffs if "q50" in d["comparison"] and d["a"].split(" / ")[1] == "centralized"]
    return out


def _diag_table(rows: list[dict[str, Any]]) -> Table:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["quantile"], r["category"]), []).append(r)
    keys = ("radius", "train_patches_clipped", "defective_worst_patch_clipped", "good_worst_patch_clipped",
            "auroc_of_max_norm")
    shown = [{"quantile": q, "category": c,
              **{k: (float(np.mean([r[k] for r in g])) if all(r[k] is not None for r in g) else None) for k in keys}}
             for (q, c), g in groups.items()]
    return Table("clipping_diagnostics", "Why: norms of the worst patches against the radius (mean over seeds)",
                 shown, ["quantile", "category", *keys])
