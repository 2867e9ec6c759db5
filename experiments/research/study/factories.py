"""`fedpatch study factories`: how many factories, at equal total data and at equal data each.

Equal total data: the same training images split iid over 1, 2, 4, ... 32 factories; the
centralized model on all of them is the reference (one per seed). Equal data per factory: a plan
of the largest count, of which the first n factories federate (more factories, more data), each
beside the centralized model on exactly those n factories' images. Reported: image AUROC (paired
CIs against centralized), coverage radius (over every training patch of the plan), bytes
uploaded and the federation's wall time. Counts above a category's number of training images
are skipped (a factory needs an image).
"""

from __future__ import annotations

import time

from experiments.research.study.common import sizes
from experiments.research.study.core import Study
from experiments.research.study.report import lines, verdict, write_report

COUNTS = (1, 2, 4, 8, 16, 32)
TITLE = "How many factories"


def counts(study: Study, replay) -> list[int]:
    levels = study.options.get("levels")
    wanted = [int(x) for x in levels] if levels else list(COUNTS)
    fewest = min(sum(1 for s in replay.plan.shards for r in s.train if r.category == c) for c in replay.plan.categories)
    kept = [n for n in wanted if n <= fewest]
    if len(kept) < len(wanted):
        study.say(f"factory counts above {fewest} skipped (the smallest category has {fewest} training images)")
    return kept


def federate(study: Study, replay, condition: str, seed: int, factories: list[int]) -> None:
    config = replay.config
    start = time.time()
    banks, report = replay.federated(config, factories)
    wall = time.time() - start
    study.results.add_all(condition, "federated", seed, replay.scored(config, banks), bank_size=sizes(banks),
                          coverage_radius=replay.coverage(config, banks), bytes_sent=report["bytes_sent"],
                          wall_s=wall, factories=len(factories))


def run(study: Study) -> None:
    grid: list[int] = []
    for seed in study.seeds:
        one = study.replay(seed, **{"federation.num_factories": 1})
        grid = counts(study, one)
        central = one.centralized(one.config, [0])
        study.results.add_all("all images", "centralized", seed, one.scored(one.config, central),
                              bank_size=sizes(central), coverage_radius=one.coverage(one.config, central))
        for n in grid:  # equal total data
            federate(study, study.replay(seed, **{"federation.num_factories": n}), f"{n} × equal share of all", seed,
                     list(range(n)))
        widest = study.replay(seed, **{"federation.num_factories": max(grid)})
        for n in grid:  # equal data per factory
            name = f"{n} × 1/{max(grid)} of the data"
            federate(study, widest, name, seed, list(range(n)))
            central_n = widest.centralized(widest.config, list(range(n)))
            study.results.add_all(name, "centralized", seed, widest.scored(widest.config, central_n),
                                  bank_size=sizes(central_n), coverage_radius=widest.coverage(widest.config, central_n))
        study.say(f"seed {seed}: done")
    pairs = [(f"{n} factories, equal total: federated − centralized", (f"{n} × equal share of all", "federated"),
              ("all images", "centralized")) for n in grid]
    pairs += [(f"{n} factories, equal per factory: federated − centralized",
               (f"{n} × 1/{max(grid)} of the data", "federated"),
               (f"{n} × 1/{max(grid)} of the data", "centralized")) for n in grid]
    diffs = study.results.difference_rows(pairs)
    findings = [f"{d['comparison'].split(':')[0]} — " + verdict(d, "federated", "centralized") for d in diffs
                if d["comparison"].startswith(f"{max(grid)} ") or d["real"]]
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, (), _plots(study, grid))


def _plots(study: Study, grid: list[int]):
    summary = study.results.summary()
    find = {(r["condition"], r["method"], r["category"]): r for r in summary}
    categories = sorted({r["category"] for r in summary})
    out = []
    for metric, label in (("image_auroc_mean", "image AUROC"), ("coverage_radius", "coverage radius"),
                          ("bytes_sent", "bytes uploaded"), ("wall_s", "federation wall time (s)")):
        series = {}
        for c in categories:
            for setting, cond in (("equal total", "{n} × equal share of all"),
                                  ("equal each", "{n} × 1/%d of the data" % max(grid))):
                rows = [find.get((cond.format(n=n), "federated", c)) for n in grid]
                if all(r is not None and metric in r for r in rows):
                    series[f"{c}, {setting}"] = ([r[metric] for r in rows],
                                                 [r["image_auroc_std"] if metric == "image_auroc_mean" else 0
                                                  for r in rows])
        if series:
            out.append(lines(grid, series, study.out / f"factories_{metric.replace('_mean', '')}.png",
                             "factories", label, f"{label} vs number of factories", logx=True))
    return out
