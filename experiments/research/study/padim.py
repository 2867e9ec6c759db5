"""`fedpatch study padim`: PaDiM (Defard et al. 2021) beside PatchCore, federated and centralized.

PaDiM (patchcore/padim.py) fits one Gaussian per patch position on the same patch embeddings
PatchCore uses (a random 100 of their channels) and scores by Mahalanobis distance. Its federated
form is exact: every factory sends its per-position count, sums and sums of outer products
(federated/padim.py, float64, upper triangles), the server adds them up, and the Gaussian it
gets is the centralized one; here each factory's statistics really go through bytes
(encode -> decode -> aggregate). PatchCore's federated bank is the coreset of coresets. Bytes
uploaded are counted for both.
"""

from __future__ import annotations

from typing import Any

import torch

from experiments.research.replay import Replay, TestSet
from experiments.research.study.common import both
from experiments.research.study.core import Study, train_images
from experiments.research.study.report import Table, verdict, write_report
from federated.padim import aggregate, decode_stats, encode_stats, site_stats
from patchcore.evaluation import ScoredSet
from patchcore.padim import Padim, select_dims

DIMS = 100
TITLE = "PaDiM vs PatchCore, federated and centralized"


def padim_scored(model: Padim, test: TestSet, transform=None) -> ScoredSet:
    emb = test.emb if transform is None else transform(test.emb)
    scores, maps = model.score_embeddings(emb, test.size)
    return ScoredSet(test.records, scores.numpy(), maps.numpy(), test.masks, test.has_mask)


def fit_both(replay: Replay, category: str, seed: int, transform=None) -> tuple[Padim, Padim, int, float]:
    """(centralized PaDiM, federated PaDiM, bytes uploaded by all factories, max |Σ_fed − Σ_central|)."""
    config, data = replay.config, replay.data
    grid = data.test[category].grid
    prep = (lambda x: x) if transform is None else transform
    every = prep(train_images(data, category))  # (N, L, D)
    indices = select_dims(int(every.shape[-1]), DIMS, seed)
    central = Padim(config.model, dims=DIMS, seed=seed, indices=indices).fit_embeddings(every, grid)
    parts, sent = [], 0
    for k in sorted({k for (k, c) in data.train if c == category and k >= 0}):
        blob = encode_stats(site_stats(prep(train_images(data, category, [k])), indices))  # what factory k sends
        sent += len(blob)
        parts.append(decode_stats(blob, expect_L=grid[0] * grid[1], expect_d=len(indices)))
    federated = Padim(config.model, dims=DIMS, seed=seed, indices=indices).set_stats(aggregate(parts), grid)
    gap = float(torch.max(torch.abs(federated.gaussian.cov - central.gaussian.cov)).item())
    return central, federated, sent, gap


def run_padim(study: Study, replay: Replay, condition: str, seed: int, transform=None) -> list[dict[str, Any]]:
    rows = []
    for category, test in replay.data.test.items():
        central, federated, sent, gap = fit_both(replay, category, seed, transform)
        study.results.add(condition, "PaDiM centralized", seed, category, padim_scored(central, test, transform))
        study.results.add(condition, "PaDiM federated", seed, category, padim_scored(federated, test, transform),
                          bytes_sent=sent)
        rows.append({"category": category, "seed": seed, "condition": condition, "padim_bytes": sent,
                     "max_cov_difference": gap})
    return rows


def run(study: Study) -> None:
    rows = []
    for seed in study.seeds:
        replay = study.replay(seed)
        _, _, report = both(study, replay, "same images", seed, coverage=False)
        for row in run_padim(study, replay, "same images", seed):
            row["patchcore_bytes"] = report["bytes_sent"].get(row["category"])
            rows.append(row)
        study.say(f"seed {seed}: done")
    c = "same images"
    diffs = study.results.difference_rows([
        ("PaDiM federated − PaDiM centralized", (c, "PaDiM federated"), (c, "PaDiM centralized")),
        ("PaDiM − PatchCore, centralized", (c, "PaDiM centralized"), (c, "centralized")),
        ("PaDiM − PatchCore, federated", (c, "PaDiM federated"), (c, "federated")),
        ("PatchCore federated − centralized", (c, "federated"), (c, "centralized"))])
    findings = [verdict(d, d["a"].split(" / ")[1], d["b"].split(" / ")[1]) for d in diffs]
    gap = max(r["max_cov_difference"] for r in rows)
    findings.append(f"Federated PaDiM's covariances equal the centralized ones to {gap:.1e} (max abs difference).")
    for category in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == category]
        pb, cb = mine[0]["padim_bytes"], mine[0]["patchcore_bytes"] or 0
        findings.append(f"{category}: PaDiM uploads {pb / 2**20:.1f} MiB in all (fixed per factory, whatever its "
                        f"image count) vs PatchCore's coresets {cb / 2**20:.1f} MiB.")
    table = Table("bytes", "Upload per seed and category (all factories together)", rows,
                  ["category", "seed", "padim_bytes", "patchcore_bytes", "max_cov_difference"])
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, [table])
