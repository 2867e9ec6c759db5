"""`fedpatch study unified`: one bank for every category vs one bank per category.

Per seed, on the same images: the per-category banks (centralized and federated, each the
config's coreset of its own category) against one unified bank over every category's patches at
the same total size (centralized: one coreset of the union; federated: every factory's images
pooled as one product, coreset of coresets). Each category's test images are scored against
the unified bank. Two tables say why a category loses: the cross-score table (image AUROC of
category A's test images scored against category B's own bank: a high off-diagonal AUROC means
B's patches already tell A's defects apart), and, under the unified centralized bank, the share
of A's test images whose highest-scoring patch found its nearest neighbour among another
category's patches (for defective images that is how an anomaly gets scored as normal).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from experiments.research.replay import Replay
from experiments.research.study.common import both, sizes
from experiments.research.study.core import Study
from experiments.research.study.report import Table, verdict, write_report
from federated.plan import FactoryPlan
from patchcore.coreset import coreset_size, greedy_coreset

UNIFIED = "all"
TITLE = "One bank for all categories vs one per category"


def pooled(plan: FactoryPlan) -> FactoryPlan:
    """Every record relabelled as one product: the sites then build one coreset of all their images."""
    def relabel(records):
        return [dataclasses.replace(r, category=UNIFIED) for r in records]

    shards = [dataclasses.replace(s, train=relabel(s.train), validation=relabel(s.validation), test=relabel(s.test))
              for s in plan.shards]
    return FactoryPlan(root=plan.root, categories=[UNIFIED], shards=shards, shifts=plan.shifts)


def unified_central(replay: Replay, seed: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(bank (M, D), origin category index of each vector, category names): the config's coreset
    ratio of the union of every category's training patches."""
    config = replay.config
    names = sorted(replay.data.test)
    parts = [replay.data.patches(n) for n in names]
    union = torch.cat(parts)
    owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    c = config.model.coreset
    idx = greedy_coreset(union, coreset_size(len(union), c.ratio), method=c.method, projection_dim=c.projection_dim,
                         num_starts=c.num_starts, seed=seed, precision=c.precision, pruning=c.pruning)
    idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
    return union[idx].float(), owner[idx], names


def nearest_origin(replay: Replay, bank: torch.Tensor, owner: np.ndarray, category: str) -> np.ndarray:
    """(N,) origin category index of the nearest bank vector to each test image's worst patch."""
    test = replay.data.test[category]
    out = np.empty(len(test.records), dtype=np.int64)
    for i, emb in enumerate(test.emb):  # (L, D)
        d = torch.cdist(emb.float(), bank)  # (L, M)
        best, arg = d.min(dim=1)
        out[i] = owner[int(arg[int(best.argmax())])]
    return out


def run(study: Study) -> None:
    cross: dict[tuple[str, str], list[float]] = {}
    origin_rows: list[dict[str, Any]] = []
    for seed in study.seeds:
        replay = study.replay(seed)
        central, _, _ = both(study, replay, "one bank per category", seed, coverage=False)
        bank, owner, names = unified_central(replay, seed)
        study.results.add_all("one bank for all", "centralized", seed,
                              replay.scored(replay.config, {n: bank for n in names}), bank_size=len(bank))
        pooled_replay = study.replay(seed, plan_edit=pooled, edit_key="unified")
        fed, report = pooled_replay.federated(pooled_replay.config, list(range(replay.config.federation.num_factories)))
        study.results.add_all("one bank for all", "federated", seed,
                              replay.scored(replay.config, {n: fed[UNIFIED] for n in names}),
                              bank_size=len(fed[UNIFIED]), bytes_sent=sum(report["bytes_sent"].values()))
        for a in names:
            for b in names:
                scored = replay.scored(replay.config, {a: central[b]})[a]
                cross.setdefault((a, b), []).append(scored.metrics()["image_auroc"])
            origin = nearest_origin(replay, bank, owner, a)
            labels = np.array([r.label for r in replay.data.test[a].records])
            own = names.index(a)
            for label, kind in ((1, "defective"), (0, "good")):
                if (labels == label).any():
                    origin_rows.append({"category": a, "images": kind, "seed": seed,
                                        "other_category_share": float((origin[labels == label] != own).mean()),
                                        "per_category_bank_size": sizes(central)[a], "unified_bank_size": len(bank)})
        study.say(f"seed {seed}: done")
    per = "one bank per category"
    pairs = [("unified − per category, centralized", ("one bank for all", "centralized"), (per, "centralized")),
             ("unified − per category, federated", ("one bank for all", "federated"), (per, "federated")),
             ("unified: federated − centralized", ("one bank for all", "federated"),
              ("one bank for all", "centralized"))]
    diffs = study.results.difference_rows(pairs)
    findings = [f"{d['comparison']} — " + verdict(d, "unified" if "unified −" in d["comparison"] else None,
                                                  "per category" if "unified −" in d["comparison"] else None)
                for d in diffs]
    losers = sorted({d["category"] for d in diffs if d["real"] and d["diff"] < 0 and "unified −" in d["comparison"]})
    findings.insert(0, f"Categories that really lose with one bank: {', '.join(losers)}." if losers else
                    "No category loses beyond noise with one bank for all (at equal total bank size).")
    tables = [_cross_table(cross), _origin_table(origin_rows)]
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, tables)


def _cross_table(cross: dict[tuple[str, str], list[float]]) -> Table:
    names = sorted({a for a, _ in cross})
    rows = [{"test category": a, **{f"bank {b}": float(np.mean(cross[(a, b)])) for b in names}} for a in names]
    return Table("cross_scores", "Cross-score table: image AUROC of the row's test images against the column's "
                 "own bank (centralized, mean over seeds)", rows, ["test category", *[f"bank {b}" for b in names]])


def _origin_table(rows: list[dict[str, Any]]) -> Table:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["images"]), []).append(r)
    shown = [{"category": c, "images": k,
              "other_category_share": float(np.mean([r["other_category_share"] for r in g])),
              "per_category_bank_size": g[0]["per_category_bank_size"],
              "unified_bank_size": g[0]["unified_bank_size"]}
             for (c, k), g in groups.items()]
    return Table("nearest_origin", "Unified centralized bank: share of test images whose worst patch's nearest "
                 "neighbour comes from another category (mean over seeds)", shown,
                 ["category", "images", "other_category_share", "per_category_bank_size", "unified_bank_size"])
