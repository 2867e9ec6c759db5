"""`fedpatch study NAME` on tiny synthetic factories: every study's tables, plots and manifest,
and a difference known to be zero whose paired bootstrap CI must cover 0 (and be ~0 wide where
the two models are the same model); the bootstrap itself against scikit-learn and on differences
known to be real."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments.app.cli import main
from experiments.research.study.stats import auroc, paired_bootstrap
from federated.shift import restrict, sample_shift
from tests.test_simulation import write_config

# One factory, float32 payloads and local ratio = global ratio: the federated bank is, vector for
# vector, the centralized coreset, so federated − centralized is exactly 0.
ONE_FACTORY = ["--set", "federation.num_factories=1", "--set", "federation.payload_dtype=float32",
               "--set", "federation.local_ratio=null", "--set", "federation.domain_shift=false"]


def study(tmp_path: Path, name: str, *extra: str, seeds=("0", "1")) -> Path:
    config = write_config(tmp_path)
    out = tmp_path / name
    code = main(["study", name, "--config", str(config), "--quiet", "--out", str(out), "--seeds", *seeds, *extra])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "runs.csv", "summary.csv", "manifest.json", "image_auroc.png", "config.yaml"} <= names
    assert "features" not in names and "replays" not in names  # the study's own cache and federations are gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seeds"] == [int(s) for s in seeds]
    assert manifest["kind"] == f"study-{name}" and "git" in manifest and "versions" in manifest
    report = (out / "report.md").read_text()
    assert report.index("## Findings") < report.index("## Setup") < report.index("## Mean ± std over seeds")
    return out


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def differences(out: Path) -> dict[tuple[str, str], dict[str, float]]:
    found = {}
    for r in rows(out / "differences.csv"):
        found[(r["comparison"], r["category"])] = {k: float(r[k])
                                                   for k in ("diff", "ci_low", "ci_high", "a_mean", "b_mean")}
    return found


def covers_zero(d: dict[str, float], exact: bool = False) -> None:
    assert d["ci_low"] <= 0.0 <= d["ci_high"], d
    if exact:
        assert d["diff"] == 0.0 and d["ci_low"] == 0.0 == d["ci_high"] and d["a_mean"] == d["b_mean"], d


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounded: ties across classes
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    batch = np.stack([scores, -scores])
    assert auroc(labels, batch) == pytest.approx([roc_auc_score(labels, scores), roc_auc_score(labels, -scores)])
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.zeros(5), np.arange(5.0))


def test_bootstrap_sees_a_real_gap_and_covers_a_null_one():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(40), np.zeros(60)].astype(int)
    good = labels + rng.normal(0, 0.5, (3, 100))  # 3 seeds of a strong model
    weak = labels * 0.3 + rng.normal(0, 0.5, (3, 100))
    gap = paired_bootstrap(labels, good, weak)
    assert gap.real and gap.agree and gap.low > 0.1 and gap.seeds == 3 and gap.images == 100
    assert gap.low <= gap.mean <= gap.high
    same = paired_bootstrap(labels, good, good)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.real and not same.agree
    covered = 0  # two models of the same quality: the 95% interval covers 0 in most replicates
    for k in range(30):
        r = np.random.default_rng(100 + k)
        a, b = (labels + r.normal(0, 1.0, (1, 100)) for _ in range(2))
        d = paired_bootstrap(labels, a, b, draws=500, seed=k)
        covered += d.low <= 0 <= d.high
    assert covered >= 25


def test_restrict_keeps_only_the_named_families():
    shift = sample_shift(1, seed=3, strength=1.0)
    geo = restrict(shift, ("geometric",))
    assert geo.is_photometric_identity and geo.rotation == shift.rotation and geo.translation == shift.translation
    light = restrict(shift, ("illumination",))
    assert light.is_geometric_identity and light.gradient_strength == shift.gradient_strength
    assert light.gains == (1, 1, 1)
    assert restrict(shift, ("photometric", "illumination", "geometric")) == shift
    with pytest.raises(Exception, match="unknown"):
        restrict(shift, ("lens",))


def test_parity_study_known_zero_with_one_factory(tmp_path):
    out = study(tmp_path, "parity", *ONE_FACTORY)
    import gzip

    with gzip.open(out / "scores.csv.gz", "rt") as handle:
        scores = list(csv.DictReader(handle))
    runs = rows(out / "runs.csv")
    assert len(scores) == sum(int(r["images"]) for r in runs)  # one row per image per run
    fed = {r["path"]: float(r["score"]) for r in scores if r["method"] == "federated" and r["seed"] == "1"}
    central = {r["path"]: float(r["score"]) for r in scores if r["method"] == "centralized" and r["seed"] == "1"}
    assert fed == central and len(fed) > 0  # the same bank: the same score for every image
    diffs = differences(out)
    for category in ("disc", "stripes"):
        covers_zero(diffs[("federated − centralized", category)], exact=True)
    assert {r["category"] for r in rows(out / "local.csv")} == {"disc", "stripes"}
    assert "each factory alone averages" in (out / "report.md").read_text()


def test_shift_study_tables_and_a_zero_shift_control(tmp_path):
    out = study(tmp_path, "shift", "--levels", "none", "severe", "--set", "threshold.holdout=0.2")
    diffs = differences(out)
    for category in ("disc", "stripes"):  # strength 0: the 'shifted' images are the clean ones
        covers_zero(diffs[("all families, none: cost of the shift, federated", category)], exact=True)
        covers_zero(diffs[("all families, none: cost of the shift, centralized", category)], exact=True)
    conditions = {(r["condition"], r["method"]) for r in rows(out / "summary.csv")}
    assert ("all families, severe", "federated, no adaptation") in conditions
    assert ("all families, severe", "centralized, re-fit") in conditions
    assert ("half the factories shifted (moderate)", "federated, re-fit") in conditions
    calib = rows(out / "recalibration.csv")
    assert {r["threshold_from"] for r in calib} == {"clean held-out", "shifted held-out"}
    assert all(0 <= float(r["false_reject_rate"]) <= 1 for r in calib)
    assert (out / "auroc_vs_severity.png").stat().st_size > 0


def test_unified_study_single_category_is_the_per_category_bank(tmp_path):
    out = study(tmp_path, "unified", "--category", "disc")
    covers_zero(differences(out)[("unified − per category, centralized", "disc")], exact=True)
    cross = rows(out / "cross_scores.csv")
    assert [r["test category"] for r in cross] == ["disc"]
    origin = rows(out / "nearest_origin.csv")
    assert all(float(r["other_category_share"]) == 0.0 for r in origin)  # one category: no other origin


def test_unified_study_two_categories_cross_table(tmp_path):
    out = study(tmp_path, "unified", seeds=("0",))
    cross = {r["test category"]: r for r in rows(out / "cross_scores.csv")}
    assert set(cross) == {"disc", "stripes"} and set(cross["disc"]) == {"test category", "bank disc", "bank stripes"}
    assert all(0.0 <= float(v) <= 1.0 for r in cross.values() for k, v in r.items() if k != "test category")
    runs = rows(out / "runs.csv")
    unified = [r for r in runs if r["condition"] == "one bank for all" and r["method"] == "centralized"]
    per = [r for r in runs if r["condition"] == "one bank per category" and r["method"] == "centralized"]
    # equal total bank size: the unified coreset is the config's ratio of the union
    assert abs(int(unified[0]["bank_size"]) - sum(int(r["bank_size"]) for r in per)) <= 2


def test_factories_study_one_factory_equals_centralized(tmp_path):
    out = study(tmp_path, "factories", "--levels", "1", "2", *ONE_FACTORY[2:6])
    diffs = differences(out)
    for category in ("disc", "stripes"):
        covers_zero(diffs[("1 factories, equal total: federated − centralized", category)], exact=True)
    summary = rows(out / "summary.csv")
    fed2 = [r for r in summary if r["condition"] == "2 × equal share of all" and r["method"] == "federated"]
    assert len(fed2) == 2 and all(float(r["bytes_sent"]) > 0 and float(r["wall_s"]) > 0 for r in fed2)
    assert (out / "factories_image_auroc.png").is_file() and (out / "factories_coverage_radius.png").is_file()


def test_ratio_study_local_2x_is_1x_at_full_ratio(tmp_path):
    out = study(tmp_path, "ratio", "--levels", "0.5", "1.0")
    diffs = differences(out)
    for category in ("disc", "stripes"):  # global 100%: 2x the local ratio is capped at 1 = 1x
        covers_zero(diffs[("global 100%: local 2x − local 1x", category)], exact=True)
    summary = {(r["condition"], r["method"], r["category"]): r for r in rows(out / "summary.csv")}
    full = summary[("global 100%", "centralized", "disc")]
    half = summary[("global 50%", "centralized", "disc")]
    assert float(full["coverage_radius"]) < 0.01 * float(half["coverage_radius"])  # every patch kept: radius ~0
    assert float(full["bank_size"]) > float(half["bank_size"])


def test_backbones_study_and_unknown_weights_file(tmp_path, capsys):
    out = study(tmp_path, "backbones", "--backbones", "efficientnet_lite0", *ONE_FACTORY)
    covers_zero(differences(out)[("efficientnet_lite0: federated − centralized", "disc")], exact=True)
    config = write_config(tmp_path)
    code = main(["study", "backbones", "--config", str(config), "--quiet", "--out", str(tmp_path / "x"),
                 "--backbones", "wide_resnet50_2=/nonexistent/w.pth"])
    assert code == 2
    assert "weights file /nonexistent/w.pth does not exist" in capsys.readouterr().err


def test_padim_study_federated_equals_centralized(tmp_path):
    out = study(tmp_path, "padim")
    diffs = differences(out)
    for category in ("disc", "stripes"):
        covers_zero(diffs[("PaDiM federated − PaDiM centralized", category)], exact=True)
    sent = rows(out / "bytes.csv")
    assert all(float(r["max_cov_difference"]) < 1e-6 and int(r["padim_bytes"]) > 0 for r in sent)


def test_clipping_study_control_radius_changes_nothing(tmp_path):
    out = study(tmp_path, "clipping", "--levels", "0.5", "1.0")
    diffs = differences(out)
    for category in ("disc", "stripes"):
        for method in ("centralized", "federated", "PaDiM centralized"):
            covers_zero(diffs[(f"clip at max norm (control) − none, {method}", category)], exact=True)
    diag = {(float(r["quantile"]), r["category"]): r for r in rows(out / "clipping_diagnostics.csv")}
    assert float(diag[(0.5, "disc")]["train_patches_clipped"]) == pytest.approx(0.5, abs=0.05)
    assert float(diag[(1.0, "disc")]["train_patches_clipped"]) == 0.0


def test_unknown_study_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["study", "sharding", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study 'sharding' is unknown") and "parity" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()
