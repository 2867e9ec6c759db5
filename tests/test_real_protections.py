"""Protections on the shared real images (../shared/data/mvtec), EfficientNet-Lite0 ImageNet, 5
IID factories, features extracted once: the poisoned factory is flagged and excluding it keeps
the clean federation's AUROC; fp16/int8 payloads keep fp32's. Skipped when the folder is absent.

Measured with configs/poisoning_sweep.yaml (seed 0, CPU): poisoner z = 9.0 (defect features) and
23.9 (noise), honest factories <= 0.73; tire image AUROC clean 0.7652, with the defect poisoner
excluded 0.7699 (+0.47 point), without the screen 0.7820; pixel AUROC 0.9911 / 0.9905 / 0.9907.
"""

from __future__ import annotations

import pytest

from experiments.research.replay import Replay, extract
from experiments.research.replay import variant as _variant
from experiments.research.sweeps import sweep_poisoning
from federated.config import ExperimentConfig
from federated.plan import plan_factories
from patchcore.config import load_config
from patchcore.model import PatchCore

pytestmark = pytest.mark.slow  # ~3 min on 2 cores: 322 + 100 images through Lite0, 8 scorings


@pytest.fixture(scope="module")
def replay(shared_mvtec, tmp_path_factory):
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "poisoning_sweep.yaml", ExperimentConfig,
                         {"data.root": str(shared_mvtec), "device": "cpu",
                          "data.cache_dir": str(tmp_path_factory.mktemp("features"))})
    plan = plan_factories(config)
    data = extract(config, plan, PatchCore(config.model, device="cpu"), 4, False)
    return config, Replay(config, data, False, plan, tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def rows(replay):
    config, engine = replay
    return sweep_poisoning(config, engine, modes=("exclude",))


def pick(rows, variant):
    return {r["category"]: r for r in rows if r["variant"] == variant}


def test_real_poisoner_is_flagged_and_honest_factories_are_not(rows):
    assert all(r["flagged"] == "none" for r in pick(rows, "clean, screen flag").values())
    for attack in ("defect features", "noise"):
        assert all(r["flagged"] == "factory-4" for r in pick(rows, f"{attack}, screen exclude").values())


def test_real_exclusion_keeps_the_clean_federation_auroc(rows):
    clean, excluded = pick(rows, "clean, screen flag"), pick(rows, "defect features, screen exclude")
    for category in clean:
        # pixel AUROC: within 0.5 point; image AUROC on tire moves by ~1-2 points between coreset
        # seeds with only 25 good test images, so the test allows 2 points (measured: 0.47 with the
        # paper's embedding, 1.1 with Lite0's concat embedding and held-out calibration images)
        assert abs(excluded[category]["pixel_auroc"] - clean[category]["pixel_auroc"]) <= 0.005
        assert abs(excluded[category]["image_auroc"] - clean[category]["image_auroc"]) <= 0.02


def test_real_fp16_and_int8_payloads_keep_the_fp32_auroc(replay):
    config, engine = replay
    scores = {}
    for dtype in ("float32", "float16", "int8"):
        banks, _ = engine.federated(_variant(config, **{"federation.payload_dtype": dtype}), {k: k for k in range(5)})
        scores[dtype] = engine.score(config, banks)
    for category, fp32 in scores["float32"].items():
        for metric in ("image_auroc", "pixel_auroc"):
            assert abs(scores["float16"][category][metric] - fp32[metric]) <= 0.0005  # 0.05 point
            assert abs(scores["int8"][category][metric] - fp32[metric]) <= 0.005
