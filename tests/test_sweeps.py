"""`fedpatch sweep` end to end on tiny synthetic factories: tables, plots, manifests, and the
invariants the sweeps exist to show (bytes halve with fp16 at equal AUROC; noise costs AUROC)."""

from __future__ import annotations

import csv
import json

import pytest

from experiments.app.cli import main
from tests.test_simulation import write_config


def rows_of(run) -> list[dict]:
    with open(run / "sweep.csv") as handle:
        return list(csv.DictReader(handle))


def test_encoding_sweep_writes_table_plots_and_halves_bytes(tmp_path):
    config = write_config(tmp_path)
    assert main(["sweep", "encoding", "--config", str(config), "--quiet", "--out", str(tmp_path / "enc")]) == 0
    run = tmp_path / "enc"
    assert ({"sweep.csv", "report.md", "manifest.json", "image_auroc.png", "auroc_vs_bytes.png"}
            <= {p.name for p in run.iterdir()})
    variants = sorted(p.name for p in (run / "federations").iterdir())
    assert variants == ["00", "01", "02"]  # one federation per encoding, each with its report only
    assert all((run / "federations" / v / "federated" / "federation.json").is_file() for v in variants)
    assert not any((run / "federations" / v / "federated" / "banks").exists() for v in variants)
    rows = {(r["variant"], r["category"]): r for r in rows_of(run)}
    for category in ("disc", "stripes"):
        fp32, fp16, int8 = (rows[(v, category)] for v in ("float32", "float16", "int8"))
        assert int(fp32["bytes_sent"]) == 2 * int(fp16["bytes_sent"])
        assert int(int8["bytes_sent"]) < int(fp16["bytes_sent"])
        assert abs(float(fp16["image_auroc"]) - float(fp32["image_auroc"])) <= 0.0005
        assert abs(float(fp16["pixel_auroc"]) - float(fp32["pixel_auroc"])) <= 0.0005
    report = (run / "report.md").read_text()
    assert "| disc | float16 |" in report and "![auroc_vs_bytes](auroc_vs_bytes.png)" in report
    assert not any("projection" in variant for variant, _ in rows)  # 128/256 >= the toy's 48 dims


def test_privacy_sweep_records_sigma_and_noise_costs_auroc(tmp_path):
    config = write_config(tmp_path)
    code = main(["sweep", "privacy", "--config", str(config), "--quiet", "--out", str(tmp_path / "dp"),
                 "--set", "model.transform.clip_norm=5.0", "--epsilons", "1", "inf"])
    assert code == 0
    run = tmp_path / "dp"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [p["epsilon"] for p in manifest["privacy"]] == [1.0] and manifest["privacy"][0]["sigma"] > 0
    rows = {(r["variant"], r["category"]): r for r in rows_of(run)}
    noisy, clean = rows[("federated, ε=1", "disc")], rows[("federated, ε=inf", "disc")]
    assert float(noisy["sigma"]) == pytest.approx(manifest["privacy"][0]["sigma"], rel=1e-4)
    assert float(noisy["pixel_auroc"]) < float(clean["pixel_auroc"])
    assert (run / "auroc_vs_epsilon.png").stat().st_size > 0


def test_sweep_without_clip_norm_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["sweep", "privacy", "--config", str(config), "--quiet", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the privacy sweep needs model.transform.clip_norm (set it in the config)"


@pytest.mark.slow
def test_a_sweep_variant_equals_a_federation_run_of_the_same_settings(tmp_path):
    """The int8 encoding variant and `run_federation` (Flower on Ray) with payload_dtype int8
    build the same global banks, and the sweep's scores are those of the real scoring path."""
    import numpy as np

    from experiments.app.simulation import run_federation
    from federated.config import ExperimentConfig
    from federated.plan import plan_factories
    from patchcore.config import load_config
    from patchcore.evaluation import score_records
    from patchcore.memory_bank import MemoryBank
    from patchcore.model import PatchCore

    config_path = write_config(tmp_path)
    assert main(["sweep", "encoding", "--config", str(config_path), "--quiet", "--keep-banks",
                 "--out", str(tmp_path / "enc")]) == 0
    saved = json.loads((tmp_path / "enc" / "sweep.json").read_text())["rows"]  # unrounded
    rows = {(r["variant"], r["category"]): r for r in saved}
    swept = tmp_path / "enc" / "federations" / "02"  # centralized, then float32, float16, int8
    assert json.loads((swept / "federated" / "federation.json").read_text())["payload_dtype"] == "int8"
    assert not (tmp_path / "enc" / "features").exists()  # the sweep's own feature cache is gone
    overrides = {"federation.payload_dtype": "int8"}
    report = run_federation(config_path, overrides, tmp_path / "ray")
    assert report["status"] == "complete"
    config = load_config(config_path, ExperimentConfig, overrides)
    plan = plan_factories(config)
    for category in ("disc", "stripes"):
        ours = MemoryBank.load(swept / "federated" / "banks" / category)
        theirs = MemoryBank.load(tmp_path / "ray" / "federated" / "banks" / category)
        # same rows; values to float rounding (Ray's clients run torch with 1 thread, this process 2)
        assert ours.features.shape == theirs.features.shape
        assert np.allclose(ours.features.numpy(), theirs.features.numpy(), rtol=1e-5, atol=1e-9)
        assert ours.metadata["kept_per_factory"] == theirs.metadata["kept_per_factory"]
        model = PatchCore.from_bank(theirs, config.model, device="cpu")
        test = [r for s in plan.shards for r in s.test if r.category == category]
        metrics = score_records(model, test, config, plan.shifts, progress=False).metrics()
        assert float(rows[("int8", category)]["image_auroc"]) == pytest.approx(metrics["image_auroc"], abs=1e-6)
        assert float(rows[("int8", category)]["pixel_auroc"]) == pytest.approx(metrics["pixel_auroc"], abs=1e-6)
