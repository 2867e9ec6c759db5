"""Evaluation at the original resolution with AUC-sPRO, as AutoVI requires, on its real layout."""

import numpy as np
from PIL import Image

from federated.config import ExperimentConfig
from patchcore.config import build
from patchcore.data import load_autovi
from patchcore.fitting import evaluate_scored, fit_category, score_records
from tests.test_data_loaders import make_autovi_tree


def test_autovi_metrics_at_original_size_with_spro(tmp_path):
    root = make_autovi_tree(tmp_path, "underbody_screw")  # 1000 x 750 images
    cat = root / "underbody_screw"
    rng = np.random.default_rng(0)
    for path in sorted(cat.glob("*/good/*.png")):  # textured normals
        Image.fromarray(rng.integers(90, 110, (750, 1000, 3), dtype=np.uint8)).save(path)
    bad = cat / "test" / "missing" / "0000.png"
    image = rng.integers(90, 110, (750, 1000, 3), dtype=np.uint8)
    for region in sorted((cat / "ground_truth" / "missing" / "0000").glob("*.png")):
        image[np.asarray(Image.open(region))[..., 0] > 0] = 255  # paint the defect where its masks are
    Image.fromarray(image).save(bad)
    config = build(ExperimentConfig, {
        "device": "cpu",
        "data": {"format": "autovi", "root": str(root), "resize": [96, 128], "crop": None,
                 "evaluate_at_original": True},
        "model": {"backbone": {"name": "resnet18", "weights": "none"}, "coreset": {"ratio": 0.5}},
    })
    records = load_autovi(root, "underbody_screw")
    model, _ = fit_category(config, "underbody_screw", records, progress=False)
    scored = score_records(model, [r for r in records if r.split == "test"], config, progress=False)
    assert scored.maps.shape == (3, 96, 128)
    metrics = evaluate_scored(scored, config, root, "underbody_screw")
    assert metrics["resolution"] == "original"
    assert metrics["image_auroc"] == 1.0
    assert 0.5 < metrics["auc_spro_0.05"] <= 1.0
    assert metrics["pixel_auroc"] > 0.9
    crop_metrics = scored.metrics()
    assert "auc_spro_0.05" not in crop_metrics
