"""`fedpatch study ratio`: coreset ratios, local and global: AUROC and coverage vs bank size.

For each global ratio (1%, 5%, 10%, 25% of all training patches) the centralized coreset and two
federations of the same global size: factories keeping the global ratio locally (local = global)
and twice it (local = 2 x global, capped at 1). Coverage radius: the largest distance from any
training patch to its nearest bank vector (what greedy k-center minimises). The question: does
the coreset of coresets need a larger local ratio than the global one to match centralized?
"""

from __future__ import annotations

from experiments.research.replay import variant
from experiments.research.study.common import sizes
from experiments.research.study.core import Study
from experiments.research.study.report import lines, verdict, write_report

RATIOS = (0.01, 0.05, 0.10, 0.25)
TITLE = "Coreset ratio: local and global"


def ratios(study: Study) -> tuple[float, ...]:
    levels = study.options.get("levels")
    return tuple(float(x) for x in levels) if levels else RATIOS


def run(study: Study) -> None:
    grid = ratios(study)
    for seed in study.seeds:
        replay = study.replay(seed)
        factories = list(range(replay.config.federation.num_factories))
        for g in grid:
            name = f"global {g:.0%}"
            config = variant(replay.config, **{"model.coreset.ratio": g, "federation.global_ratio": g,
                                               "federation.local_ratio": g})
            central = replay.centralized(config, factories)
            study.results.add_all(name, "centralized", seed, replay.scored(config, central), bank_size=sizes(central),
                                  coverage_radius=replay.coverage(config, central))
            for label, local in (("local = global", g), ("local = 2x global", min(1.0, 2 * g))):
                config_l = variant(config, **{"federation.local_ratio": local})
                banks, report = replay.federated(config_l, factories)
                study.results.add_all(name, f"federated, {label}", seed, replay.scored(config_l, banks),
                                      bank_size=sizes(banks), coverage_radius=replay.coverage(config_l, banks),
                                      bytes_sent=report["bytes_sent"])
        study.say(f"seed {seed}: done")
    names = [f"global {g:.0%}" for g in grid]
    pairs = []
    for n in names:
        pairs += [(f"{n}: federated (local = global) − centralized", (n, "federated, local = global"),
                   (n, "centralized")),
                  (f"{n}: local 2x − local 1x", (n, "federated, local = 2x global"), (n, "federated, local = global"))]
    diffs = study.results.difference_rows(pairs)
    findings = [f"{d['comparison'].split(':')[0]} — " + verdict(d) for d in diffs
                if "local 2x" in d["comparison"] or d["real"]]
    findings.insert(0, _summary_line(diffs))
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, (), _plots(study, names, grid))


def _summary_line(diffs) -> str:
    gaps = [d for d in diffs if "local 2x" in d["comparison"]]
    real = [d for d in gaps if d["real"] and d["diff"] > 0]
    if not gaps:
        return "No local-ratio comparison could be made."
    if not real:
        return (f"A local ratio twice the global one bought no real AUROC gain in any of {len(gaps)} "
                f"(ratio, category) cells: the coreset of coresets does not need it here.")
    return (f"A local ratio twice the global one helped in {len(real)} of {len(gaps)} (ratio, category) cells: "
            + ", ".join(f"{d['comparison'].split(':')[0]} {d['category']} {d['diff']:+.3f}" for d in real) + ".")


def _plots(study: Study, names: list[str], grid: tuple[float, ...]):
    summary = study.results.summary()
    out = []
    for metric, label, fname in (("image_auroc_mean", "image AUROC", "auroc_vs_bank_size.png"),
                                 ("coverage_radius", "coverage radius", "coverage_vs_bank_size.png")):
        series = {}
        for category in sorted({r["category"] for r in summary}):
            for method in ("centralized", "federated, local = global", "federated, local = 2x global"):
                rows = [next((r for r in summary
                              if (r["condition"], r["method"], r["category"]) == (n, method, category)), None)
                        for n in names]
                if all(r is not None and metric in r for r in rows):
                    series[f"{category} {method}"] = ([r[metric] for r in rows],
                                                      [r.get("image_auroc_std", 0) if metric.startswith("image") else 0
                                                       for r in rows])
        if series:
            out.append(lines([100 * g for g in grid], series, study.out / fname, "global coreset ratio (% of patches)",
                             label, f"{label} vs bank size", logx=True))
    return out
