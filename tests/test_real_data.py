"""Real images (../shared/data/mvtec: tire, hazelnut) with EfficientNet-Lite0 ImageNet weights.

Floors sit a little under what was measured (see the closing note of the foundation issue);
tire is the hard one (RGB-only PatchCore is reported near 0.70-0.77 image AUROC on it).
Skipped when the folder is absent.
"""


import pytest

from federated.config import ExperimentConfig
from patchcore.config import load_config
from patchcore.data.sources import load_records
from patchcore.fitting import fit_category, score_records

pytestmark = pytest.mark.slow

# category: (image AUROC, pixel AUROC, AUPRO) floors. Measured (seed 0, CPU, commit of this
# file): hazelnut 1.000 / 0.987 / 0.942, tire 0.766 / 0.991 / 0.957.
FLOORS = {
    "hazelnut": (0.95, 0.96, 0.90),
    "tire": (0.72, 0.97, 0.92),
}


@pytest.fixture(scope="module")
def real_metrics(shared_mvtec):
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "shared_real.yaml", ExperimentConfig,
                         {"data.root": str(shared_mvtec), "device": "cpu"})
    out = {}
    for category in FLOORS:
        records = load_records(config.data, shared_mvtec, category)
        model, _ = fit_category(config, category, records, progress=False)
        scored = score_records(model, [r for r in records if r.split == "test"], config, progress=False)
        out[category] = scored.metrics()
    return out


@pytest.mark.parametrize("category", sorted(FLOORS))
def test_lite0_imagenet_meets_floors_on_real_images(real_metrics, category):
    m = real_metrics[category]
    image_floor, pixel_floor, aupro_floor = FLOORS[category]
    print(category, {k: round(m[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")})
    assert m["image_auroc"] >= image_floor
    assert m["pixel_auroc"] >= pixel_floor
    assert m["aupro"] >= aupro_floor
