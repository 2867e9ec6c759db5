"""`fedpatch study shift`: clean -> shifted, as the field evaluates it.

Banks are fitted on clean factories, then the test images arrive through each factory's camera
shift (federated/shift.py) and are scored with no adaptation; next the accept/reject threshold is
re-calibrated on shifted held-out normals only (the bank unchanged); last, the banks are re-fitted
on shifted training images. Severities mild / moderate / severe (shift strength 0.5 / 1 / 2) with
every family, and each family alone at moderate strength: photometric (gain, brightness,
contrast, gamma), illumination (a lamp gradient), geometric (rotation + translation). The last
condition shifts only the first half of the factories. Federated and centralized side by side,
every difference paired on the same test images (the shifted copy of an image is paired with its
clean self).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.research.replay import Replay, embed_test
from experiments.research.study.common import both
from experiments.research.study.core import Study
from experiments.research.study.report import Table, lines, verdict, write_report
from federated.config import SHIFT_FAMILIES

SEVERITY = {"none": 0.0, "mild": 0.5, "moderate": 1.0, "severe": 2.0}
ALL = SHIFT_FAMILIES
CONDITIONS = (("all families", "mild", ALL), ("all families", "moderate", ALL), ("all families", "severe", ALL),
              ("photometric", "moderate", ("photometric",)), ("illumination", "moderate", ("illumination",)),
              ("geometric", "moderate", ("geometric",)))
CONTROL = (("all families", "none", ALL),)  # strength 0: on request (--levels none), must cost exactly 0
PARTIAL = "half the factories shifted (moderate)"
TITLE = "Domain shift: no adaptation, re-calibration, re-fit"


def shifted_replay(study: Study, seed: int, strength: float, families: tuple[str, ...],
                   shifted: int | None = None) -> Replay:
    return study.replay(seed, **{"federation.domain_shift": True, "federation.shift_strength": strength,
                                 "federation.shift_families": families, "federation.shifted_factories": shifted})


def held_out_scores(study: Study, replay: Replay, bank: Any, category: str) -> np.ndarray | None:
    """Scores under `bank` of the held-out training normals of `category` (through their
    factories' shifts); None when the config holds none out (threshold.holdout 0)."""
    records = [r for s in replay.plan.shards for r in s.validation if r.category == category]
    if not records:
        return None
    test = embed_test(study.model(replay.config), records, replay.config, replay.plan.shifts, False, "held out",
                      study.memo)
    return replay.scored(replay.config, {category: bank}, {category: test})[category].scores


def decisions(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    reject = scores > threshold
    good, bad = labels == 0, labels == 1
    tp, fp, fn = int((reject & bad).sum()), int((reject & good).sum()), int((~reject & bad).sum())
    return {"false_reject_rate": float(fp / max(1, good.sum())), "detection_rate": float(tp / max(1, bad.sum())),
            "f1": float(2 * tp / max(1, 2 * tp + fp + fn))}


def recalibration(study: Study, seed: int, name: str, shifted: Replay, banks: dict[str, dict[str, Any]],
                  no_adaptation: dict[str, dict[str, Any]],
                  clean_held: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Decisions on shifted test images (`no_adaptation`: the clean banks' ScoredSets there) at
    thresholds from clean held-out normals (`clean_held`, scored once per seed) vs shifted ones."""
    rows = []
    q = study.config.threshold.quantile
    for method, per_category in banks.items():
        for category, bank in per_category.items():
            source = {"clean held-out": clean_held[method][category],
                      "shifted held-out": held_out_scores(study, shifted, bank, category)}
            test = no_adaptation[method][category]
            for label, calib in source.items():
                if calib is None:
                    continue
                t = float(np.quantile(calib, q))
                rows.append({"condition": name, "method": method, "category": category, "seed": seed,
                             "threshold_from": label, "threshold": t, **decisions(test.scores, test.labels, t)})
    return rows


def run_seed(study: Study, seed: int, conditions) -> list[dict[str, Any]]:
    clean = study.replay(seed, **{"federation.domain_shift": False})
    central, federated, _ = both(study, clean, "clean", seed, coverage=False)
    banks = {"centralized": central, "federated": federated}
    clean_held = {m: {c: held_out_scores(study, clean, b, c) for c, b in per.items()} for m, per in banks.items()}
    calib_rows = []
    for family, severity, families in conditions:
        name = f"{family}, {severity}"
        shifted = shifted_replay(study, seed, SEVERITY[severity], families)
        no_adaptation = _adapt(study, seed, name, clean, shifted, banks)
        calib_rows += recalibration(study, seed, name, shifted, banks, no_adaptation, clean_held)
    half = max(1, study.config.federation.num_factories // 2)
    partial = shifted_replay(study, seed, SEVERITY["moderate"], ALL, half)
    _adapt(study, seed, PARTIAL, clean, partial, banks)
    study.say(f"seed {seed}: done")
    return calib_rows


def _adapt(study: Study, seed: int, name: str, clean: Replay, shifted: Replay,
           banks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """No adaptation (the clean banks on shifted test images), then re-fit on shifted training
    images; returns the no-adaptation ScoredSets {method: {category: ScoredSet}}."""
    scored = {method: clean.scored(clean.config, per, shifted.data.test) for method, per in banks.items()}
    for method, per in scored.items():
        study.results.add_all(name, f"{method}, no adaptation", seed, per)
    both(study, shifted, name, seed, coverage=False, names=("centralized, re-fit", "federated, re-fit"))
    return scored


def comparisons(names: list[str]) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    pairs = []
    for name in names:
        pairs += [(f"{name}: cost of the shift, federated", (name, "federated, no adaptation"),
                   ("clean", "federated")),
                  (f"{name}: cost of the shift, centralized", (name, "centralized, no adaptation"),
                   ("clean", "centralized")),
                  (f"{name}: re-fit gain, federated", (name, "federated, re-fit"),
                   (name, "federated, no adaptation")),
                  (f"{name}: federated − centralized, re-fit", (name, "federated, re-fit"),
                   (name, "centralized, re-fit"))]
    return pairs


def chosen(study: Study):
    """The conditions named by --levels (a family or a severity word matches), default all."""
    levels = study.options.get("levels")
    if not levels:
        return CONDITIONS
    picked = tuple(c for c in CONTROL + CONDITIONS if any(level in (c[0], c[1], f"{c[0]}, {c[1]}") for level in levels))
    if not picked:
        from patchcore.errors import ConfigError

        raise ConfigError(f"--levels {' '.join(levels)} names no shift condition; valid: none, mild, moderate, severe, "
                          "photometric, illumination, geometric")
    return picked


def run(study: Study) -> None:
    conditions = chosen(study)
    calib = [row for seed in study.seeds for row in run_seed(study, seed, conditions)]
    names = [f"{f}, {s}" for f, s, _ in conditions] + [PARTIAL]
    diffs = study.results.difference_rows(comparisons(names))
    findings = _findings(diffs)
    tables = [Table("recalibration", "Decisions on shifted test images: threshold from clean vs shifted held-out "
                    "normals (no re-fit; mean over seeds)", _mean_calibration(calib),
                    ["condition", "method", "category", "threshold_from", "threshold", "false_reject_rate",
                     "detection_rate", "f1"],
                    "The threshold is the config's quantile of held-out normal scores (threshold.holdout of each "
                    "factory's training images, never in a bank).")] if calib else []
    figure = _severity_plot(study)
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs, tables, [figure])


def _findings(diffs: list[dict[str, Any]]) -> list[str]:
    out = []
    for d in diffs:
        if d["comparison"].startswith("all families, severe: cost of the shift, federated"):
            out.append("Severe shift, no adaptation, federated — " + verdict(d, "shifted", "clean"))
        if d["comparison"].startswith("all families, severe: re-fit gain"):
            out.append("Re-fitting on shifted images, federated — " + verdict(d, "re-fit", "no adaptation"))
        if d["comparison"].startswith("all families, moderate: federated − centralized"):
            out.append("Under moderate shift after re-fit — " + verdict(d, "federated", "centralized"))
        if d["comparison"].startswith(f"{PARTIAL}: federated − centralized"):
            out.append("Half the factories shifted — " + verdict(d, "federated", "centralized"))
    costs = [d for d in diffs if "moderate: cost of the shift, federated" in d["comparison"] and
             d["comparison"].split(",")[0] in ALL]
    if costs:
        worst = min(costs, key=lambda d: d["diff"])
        out.append(f"The family that costs most alone (moderate, federated): {worst['comparison'].split(',')[0]} "
                   f"on {worst['category']} ({worst['diff']:+.3f}).")
    return out


def _mean_calibration(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["condition"], r["method"], r["category"], r["threshold_from"]), []).append(r)
    return [{"condition": k[0], "method": k[1], "category": k[2], "threshold_from": k[3],
             **{m: float(np.mean([r[m] for r in g]))
                for m in ("threshold", "false_reject_rate", "detection_rate", "f1")}}
            for k, g in groups.items()]


def _severity_plot(study: Study):
    summary = {(r["condition"], r["method"], r["category"]): r for r in study.results.summary()}
    categories = sorted({k[2] for k in summary})
    levels = [s for s in ("mild", "moderate", "severe") if any(k[0] == f"all families, {s}" for k in summary)]
    if not levels:
        return None
    x = [0.0] + [SEVERITY[s] for s in levels]
    series = {}
    for category in categories:
        for method in ("federated", "centralized"):
            keys = [("clean", method, category)] + [(f"all families, {s}", f"{method}, no adaptation", category)
                                                     for s in levels]
            if all(k in summary for k in keys):
                series[f"{category} {method}"] = ([summary[k]["image_auroc_mean"] for k in keys],
                                                  [summary[k]["image_auroc_std"] for k in keys])
    if not series:
        return None
    return lines(x, series, study.out / "auroc_vs_severity.png", "shift strength (0 = clean)",
                 "image AUROC, no adaptation", "Image AUROC as the shift grows (banks fitted on clean images)")
