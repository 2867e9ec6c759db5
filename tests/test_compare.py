"""`fedpatch compare` end to end on tiny synthetic factories: report, plots, no processes left."""

import json

import psutil
import pytest
import yaml

from experiments.app.cli import main

pytestmark = pytest.mark.slow  # Ray start-up + three fits: ~30 s on 2 cores


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone
        return False


def test_compare_writes_report_plots_and_leaves_no_processes(tmp_path, capsys):
    config = {
        "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "results"),
        "data": {"format": "synthetic", "root": str(tmp_path / "syn"), "resize": 64, "crop": 64, "batch_size": 8,
                 "synthetic": {"categories": ["stripes", "disc"], "size": 64, "n_train": 9, "n_test_good": 3,
                               "n_test_defect": 3}},
        "model": {"backbone": {"name": "efficientnet_lite0", "weights": "imagenet"}},
        "federation": {"num_factories": 3, "partition": "iid", "domain_shift": True},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--quiet", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for name in ("results.json", "results.csv", "report.md", "manifest.json", "image_auroc.png",
                 "pixel_auroc.png", "aupro.png", "upload_bytes.png", "federated/federation.json",
                 "federated/banks/disc.safetensors", "centralized/banks/disc.safetensors"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    methods = {(r["category"], r["method"]) for r in results["rows"]}
    assert {("disc", "centralized"), ("disc", "federated"), ("disc", "local (mean of 3)")} <= methods
    central = next(r for r in results["rows"] if r["category"] == "disc" and r["method"] == "centralized")
    federated = next(r for r in results["rows"] if r["category"] == "disc" and r["method"] == "federated")
    # equal final bank size, up to each factory's coreset size being floored (local = global ratio:
    # the union of 3 floored local coresets can fall a vector or two short of the budget)
    assert central["bank_size"] - 3 <= federated["bank_size"] <= central["bank_size"]
    assert all(u["upload_ratio"] <= 0.05 for u in results["uploads"])  # fp16 10% coresets
    assert "federated" in out and "report:" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["timings_s"]) >= {"centralized", "federation"}
    # every process the federation started (Ray's GCS, raylet, workers) is gone; other Ray
    # sessions on the machine, if any, are not ours to judge
    started = results["federation"]["ray_processes"]
    assert started and not [pid for pid in started if _alive(pid)]
