"""A real deployment on loopback: a TLS SuperLink with SuperNode authentication and three
SuperNodes as OS processes, each pointed at its own folder (different image counts, one site
without a category), the federation started with `flwr run`; and the same with one SuperNode
killed during train. The server process gets no data root: only the sites read images."""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from experiments.app.deploy import Deployment, SiteSpec, check_sites
from federated.config import ExperimentConfig
from patchcore.config import load_config
from patchcore.data.synthetic import make_synthetic_dataset
from tests.test_simulation import TINY

pytestmark = pytest.mark.slow
# Training images per site and category; plant-c has no `disc` at all.
SITES = {"plant-a": {"stripes": 4, "disc": 3}, "plant-b": {"stripes": 2, "disc": 3},
         "plant-c": {"stripes": 2}}


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def make_sites(root: Path) -> dict[str, Path]:
    """Three MVTec-layout folders cut from one synthetic dataset: disjoint training images in
    the counts of SITES, and every third test image (with its mask) per site."""
    source = make_synthetic_dataset(root / "source", ["stripes", "disc"], n_train=8, n_test_good=3,
                                    n_test_defect=3, size=64, seed=0)
    folders = {}
    for k, (name, plan) in enumerate(SITES.items()):
        folder = root / name
        for category, n in plan.items():
            goods = sorted((source / category / "train" / "good").glob("*.png"))
            used = sum(SITES[m].get(category, 0) for m in list(SITES)[:k])
            for image in goods[used:used + n]:
                _copy(image, folder / category / "train" / "good" / image.name)
            tests = sorted((source / category / "test").glob("*/*.png"))
            for image in tests[k::3]:
                _copy(image, folder / category / "test" / image.parent.name / image.name)
                mask = source / category / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
                if mask.is_file():
                    _copy(mask, folder / category / "ground_truth" / image.parent.name / mask.name)
        folders[name] = folder
    return folders


def write_config(folder: Path, **federation) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(folder / "results")
    cfg["threshold"] = {"holdout": 0.1}  # the default: sites calibrate the global threshold
    cfg["data"] = {"format": "mvtec", "root": "", "resize": 64, "crop": 64, "batch_size": 8}
    cfg["federation"].update({"domain_shift": False, "node_timeout_s": 120, **federation})
    path = folder / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _no_process_left(deployment: Deployment) -> None:
    assert all(p.poll() is not None for p in deployment.processes.values())
    assert not deployment._watch.survivors(), deployment._watch.survivors()


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    return make_sites(tmp_path_factory.mktemp("sites"))


def test_three_sites_each_with_its_own_folder_federate_over_tls(sites, tmp_path):
    config_path = write_config(tmp_path, num_factories=3)
    config = load_config(config_path, ExperimentConfig)
    assert config.data.root == ""  # the server has no data root: only the sites read images
    specs = [SiteSpec(name, path) for name, path in sites.items()]
    counts = check_sites(config, specs)
    impostor = SiteSpec("plant-a", sites["plant-c"])  # a registered node that claims plant-a too
    deployment = Deployment(config_path, [*specs, impostor], tmp_path / "run")
    try:
        deployment.start()
        report = deployment.run()
    finally:
        deployment.stop()
    _no_process_left(deployment)
    assert report["status"] == "complete" and not report["failed"] and not report["missing"]
    bound = deployment.bindings["plant-a"]
    assert [r["factory"] for r in report["refused"]] == ["plant-a"]
    assert report["refused"][0]["reason"] == f"plant-a is bound to node {bound}"
    assert report["refused"][0]["node_id"] != bound == report["sites"]["plant-a"]["node_id"]
    for name, folder in sites.items():
        # no validation folder: each site holds ceil(0.1 n) of a category's n training normals
        # out (threshold.holdout) to calibrate the global threshold; the rest trains
        per_category = [len(list(c.glob("train/good/*.png"))) for c in folder.iterdir() if c.is_dir()]
        train = sum(n - math.ceil(0.1 * n) if n >= 2 else n for n in per_category)
        assert report["sites"][name]["train_images"] == train == counts[name]["train"]
        assert report["factories"][name]["num_images"] == train
        assert report["sites"][name]["categories"] == sorted(SITES[name])
    assert report["calibration"] and all(c["num_normal"] >= 1 for c in report["calibration"].values())
    disc = json.loads((tmp_path / "run" / "federated" / "banks" / "disc.json").read_text())["metadata"]
    assert disc["threshold"]["details"]["source"] == "held-out training normals at the sites"
    assert report["aggregation"]["disc"]["factories"] == ["plant-a", "plant-b"]  # plant-c has none
    assert report["aggregation"]["stripes"]["factories"] == ["plant-a", "plant-b", "plant-c"]
    assert sorted(report["per_factory_metrics"]["plant-c"]) == ["stripes"]
    saved = json.loads((tmp_path / "run" / "federated" / "federation.json").read_text())
    assert saved["status"] == "complete"
    assert (tmp_path / "run" / "federated" / "banks" / "disc.safetensors").is_file()


def test_a_supernode_killed_during_train_is_named_once_and_the_rest_completes(sites, tmp_path):
    config_path = write_config(tmp_path, num_factories=3, faults=["plant-b:hang"], hang_s=600,
                               round_timeout_s=240)
    deployment = Deployment(config_path, [SiteSpec(n, p) for n, p in sites.items()], tmp_path / "run")
    report_path = tmp_path / "run" / "federated" / "federation.json"
    killed = threading.Event()

    def kill_in_train() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if json.loads(report_path.read_text()).get("phase") == "train":
                    time.sleep(2.0)  # the train messages are out
                    deployment.stop_process("site-plant-b", signal.SIGKILL)
                    killed.set()
                    return
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.2)

    try:
        deployment.start()
        run_id = deployment.submit()
        killer = threading.Thread(target=kill_in_train, daemon=True)
        killer.start()
        report = deployment.wait(run_id)
        killer.join()
    finally:
        deployment.stop()
    _no_process_left(deployment)
    assert killed.is_set() and report["status"] == "complete"
    named = [e for kind in ("failed", "missing", "refused") for e in report[kind]]
    assert [e["factory"] for e in named] == ["plant-b"], named
    assert named[0]["phase"] == "train" and named[0]["reason"]
    assert report["aggregation"]["stripes"]["factories"] == ["plant-a", "plant-c"]
    assert sorted(report["per_factory_metrics"]) == ["plant-a", "plant-c"]
