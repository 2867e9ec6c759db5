"""A poisoned factory (1 of 5 sends the coreset of its defective images, or noise) is flagged by
the server's screen, and excluding it brings the AUROC back to the clean federation's.

The federation is replayed in-process on embeddings extracted once (experiments/research/sweeps.py), with
the same client (`make_payload`) and server (`aggregate_all`) functions the Flower apps call."""

from __future__ import annotations

import pytest

from experiments.research.replay import Replay, extract
from experiments.research.sweeps import sweep_poisoning
from federated.config import ExperimentConfig
from federated.plan import plan_factories
from patchcore.config import load_config
from patchcore.model import PatchCore

pytestmark = pytest.mark.slow  # ~30 s: 5 factories x 2 products, Lite0 at 128 px


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    # The classic synthetic factories, iid (the demo's hard, non-IID ones make small honest
    # factories look outlying to the screen: a property of that data, not of this attack test)
    classic = {"data.synthetic.defect_contrast": 1.0, "data.synthetic.defect_size": 1.0,
               "data.synthetic.texture_variation": 0.0, "data.synthetic.lighting_variation": 0.0,
               "federation.partition": "iid", "federation.shift_strength": 1.0, "federation.local_ratio": 0.1}
    overrides = {**classic, "federation.num_factories": 5, "data.synthetic.n_train": 30,
                 "data.synthetic.n_test_defect": 15, "data.synthetic.n_test_good": 8,
                 "data.root": str(tmp_path_factory.mktemp("synthetic")), "device": "cpu",
                 "data.cache_dir": str(tmp_path_factory.mktemp("features"))}
    config = load_config("configs/default.yaml", ExperimentConfig, overrides)
    plan = plan_factories(config)
    data = extract(config, plan, PatchCore(config.model, device="cpu"), 4, False)
    replay = Replay(config, data, False, plan, tmp_path_factory.mktemp("sweep"))
    return sweep_poisoning(config, replay, modes=("off", "exclude", "filter"))


def pick(rows, variant: str) -> dict[str, dict]:
    return {r["category"]: r for r in rows if r["variant"] == variant}


def test_honest_federation_flags_nobody(rows):
    for row in pick(rows, "clean, screen flag").values():
        assert row["flagged"] == "none" and row["z_poisoner"] < 3.5


@pytest.mark.parametrize("attack", ["defect features", "noise"])
def test_poisoner_is_flagged_and_exclusion_restores_the_clean_auroc(rows, attack):
    clean, excluded = pick(rows, "clean, screen flag"), pick(rows, f"{attack}, screen exclude")
    for category, row in excluded.items():
        assert row["flagged"] == "factory-4" and row["poisoner_flagged"]
        for metric in ("image_auroc", "pixel_auroc"):  # within 0.5 point (0.005) of the clean run
            assert abs(row[metric] - clean[category][metric]) <= 0.005, (attack, category, metric)
    filtered = pick(rows, f"{attack}, screen filter")
    assert all(r["flagged"] == "factory-4" for r in filtered.values())
    undefended = pick(rows, f"{attack}, screen off")
    print(attack, {c: (round(undefended[c]["pixel_auroc"], 4), round(excluded[c]["pixel_auroc"], 4),
                       round(clean[c]["pixel_auroc"], 4)) for c in clean})


def test_the_defect_attack_is_real_without_the_screen(rows):
    """Without detection the defect features hide defects: pixel AUROC drops below the clean run
    (stripes, where the synthetic defects are subtle); the screen is what prevents it."""
    clean, undefended = pick(rows, "clean, screen flag"), pick(rows, "defect features, screen off")
    assert undefended["stripes"]["pixel_auroc"] < clean["stripes"]["pixel_auroc"] - 0.003
