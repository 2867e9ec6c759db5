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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from experiments.research.replay import variant
from experiments.research.study.common import both
from experiments.research.study.core import Study
from experiments.research.study.padim import run_padim
from experiments.research.study.report import Table, verdict, write_report
from experiments.research.study.stats import auroc
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


@dataclass
class Norms:
    """One seed's patch norms, computed once for every radius: training patches per category,
    and each test image's longest patch with its label."""

    train: dict[str, torch.Tensor]  # category -> (N·L,)
    worst: dict[str, np.ndarray]  # category -> (N,) max patch norm of each test image
    labels: dict[str, np.ndarray]  # category -> (N,)

    @classmethod
    def of(cls, replay) -> "Norms":
        tests = replay.data.test
        return cls(train={c: replay.data.patches(c).norm(dim=1) for c in tests},
                   worst={c: t.emb.norm(dim=2).max(dim=1).values.numpy() for c, t in tests.items()},
                   labels={c: np.array([rec.label for rec in t.records]) for c, t in tests.items()})

    def radius(self, q: float) -> float:
        """The q-quantile of the pooled training norms; q = 1: the largest norm, nudged up (clips nothing)."""
        norms = torch.cat(list(self.train.values()))
        if q >= 1.0:
            return float(norms.max()) * (1 + 1e-6)
        # torch.quantile caps its input size: a fixed random million when there are more
        sample = norms[torch.randperm(len(norms), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        return float(torch.quantile(sample.double(), q))


def diagnostics(norms: Norms, r: float, q: float, seed: int) -> list[dict[str, Any]]:
    rows = []
    for category, worst in norms.worst.items():
        labels = norms.labels[category]
        row = {"quantile": q, "category": category, "seed": seed, "radius": r,
               "train_patches_clipped": float((norms.train[category] > r).float().mean())}
        for value, kind in ((1, "defective"), (0, "good")):
            row[f"{kind}_worst_patch_clipped"] = (float((worst[labels == value] > r).mean())
                                                  if (labels == value).any() else None)
        row["auroc_of_max_norm"] = float(auroc(labels, worst)) if 0 < labels.sum() < len(labels) else None
        rows.append(row)
    return rows


def run(study: Study) -> None:
    diag: list[dict[str, Any]] = []
    grid = quantiles(study)
    for seed in study.seeds:
        replay = study.replay(seed)
        norms = Norms.of(replay)
        base = variant(replay.config, **{"model.transform": TransformConfig()})
        both(study, replay, NONE, seed, config=base, coverage=False)
        run_padim(study, replay, NONE, seed)
        for q in grid:
            r = norms.radius(q)
            config = variant(base, **{"model.transform": TransformConfig(clip_norm=r)})
            both(study, replay, label(q), seed, config=config, coverage=False)
            run_padim(study, replay, label(q), seed, transform=lambda x, r=r: _clip(x, r))
            diag += diagnostics(norms, r, q, seed)
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
                   + (" (" + ", ".join(f"{d['comparison'].split(' −')[0]} {d['category']} {d['diff']:+.3f}"
                                       for d in up) + ")"
                      if up else "")
                   + f", loses in {len(down)}"
                   + (" (" + ", ".join(f"{d['comparison'].split(' −')[0]} {d['category']} {d['diff']:+.3f}"
                                       for d in down) + ")"
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
