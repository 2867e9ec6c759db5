"""`fedpatch study parity`: federated vs centralized vs each factory alone, over seeds, with CIs.

Per seed: the centralized PatchCore on the union of every factory's training images, the
federation (coreset of coresets, the same global bank size) and each factory alone; the first
two on the same union test images (paired bootstrap CI of the difference), each local model on
its own factory's test images (mean over factories). Run it on the real AutoVI images with
`fedpatch study parity --config configs/shared_autovi.yaml`.
"""

from __future__ import annotations

import numpy as np

from experiments.research.study.common import both
from experiments.research.study.core import Study, subset
from experiments.research.study.report import Table, verdict, write_report
from experiments.research.study.stats import mean_std
from federated.partition import factory_name

TITLE = "Federated vs centralized vs local-only"


def local_rows(study: Study, local: dict[tuple[str, int], list[float]]) -> list[dict]:
    rows = []
    for category in sorted({c for c, _ in local}):
        per_seed = [float(np.mean(v)) for (c, _), v in sorted(local.items()) if c == category]
        every = [x for (c, _), v in local.items() if c == category for x in v]
        mean, std = mean_std(per_seed)
        rows.append({"category": category, "local_mean": mean, "local_std": std,
                     "worst_factory": min(every), "best_factory": max(every)})
    return rows


def run(study: Study) -> None:
    local: dict[tuple[str, int], list[float]] = {}
    for seed in study.seeds:
        replay = study.replay(seed)
        config = replay.config
        both(study, replay, "all factories", seed)
        for k in range(config.federation.num_factories):
            own = subset(replay.data.test, lambda r, k=k: r.domain == factory_name(k))
            bank = replay.centralized(config, [k])
            for category, scored in replay.scored(config, {c: b for c, b in bank.items() if c in own}, own).items():
                if 0 < scored.labels.sum() < len(scored.labels):
                    local.setdefault((category, seed), []).append(scored.metrics()["image_auroc"])
        study.say(f"seed {seed}: done")
    diffs = study.results.difference_rows([("federated − centralized", ("all factories", "federated"),
                                            ("all factories", "centralized"))])
    locals_ = local_rows(study, local)
    findings = [verdict(d, "federated", "centralized") for d in diffs]
    for row in locals_:
        fed = next((d["a_mean"] for d in diffs if d["category"] == row["category"]), float("nan"))
        findings.append(f"{row['category']}: each factory alone averages {row['local_mean']:.3f} ± "
                        f"{row['local_std']:.3f} on its own test images ({row['local_mean'] - fed:+.3f} vs federated; "
                        f"factories range {row['worst_factory']:.3f}–{row['best_factory']:.3f}).")
    table = Table("local", "Each factory alone (its own test images; mean over factories, ± std over seeds)",
                  locals_, ["category", "local_mean", "local_std", "worst_factory", "best_factory"])
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, [table])
