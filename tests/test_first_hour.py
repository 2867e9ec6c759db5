"""What a new user meets in the first hour: lost image area said out loud, a threshold on the
MVTec layout, image metrics where there are no masks, F1 beside its trivial baseline, and the
layer weightings' embeddings."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchcore.config import BackboneConfig, DataConfig, ModelConfig
from patchcore.data import coverage
from patchcore.data.sources import hold_out, load_records
from patchcore.evaluation import ScoredSet
from patchcore.features import embed, embed_concat
from patchcore.metrics import evaluate, f1_flag_all
from patchcore.model import backbone_id, embedding_dim
from tests.conftest import REPO
from tests.test_data_loaders import save_png

SHARED = REPO.parent / "shared" / "data"


def _tree(root: Path, size: tuple[int, int], mask_box=(40, 40, 60, 60)) -> Path:
    """MVTec layout, one category `part` of `size` = (W, H) images: 3 train, 1 good + 1 defect test."""
    cat = root / "part"
    for i in range(3):
        save_png(cat / "train" / "good" / f"{i:03d}.png", size=size)
    save_png(cat / "test" / "good" / "000.png", size=size)
    save_png(cat / "test" / "scratch" / "000.png", size=size)
    save_png(cat / "ground_truth" / "scratch" / "000_mask.png", size=size, value=0, box=mask_box, mode="L")
    return root


@pytest.fixture(autouse=True)
def fresh_warnings():
    coverage._SEEN.clear()
    yield
    coverage._SEEN.clear()


def test_a_tall_image_warns_once_that_the_crop_loses_area(tmp_path, caplog):
    root = _tree(tmp_path, (100, 200), mask_box=(10, 40, 30, 60))  # 1:2, as the 800x1600 parts
    data = DataConfig(root=str(root))
    with caplog.at_level(logging.WARNING, logger="fedpatch.data"):
        load_records(data, root, "part")
        load_records(data, root, "part")  # once per category, not per load
    lines = [r.getMessage() for r in caplog.records if "center-crop" in r.getMessage()]
    assert len(lines) == 1
    # a 256 x 512 frame, 224 x 224 of it = 38% of the area; the mask sits at rows 10-30 of 200,
    # above the crop's rows 56.25-143.75 (in original pixels): it lies entirely outside
    assert "keeps 38% of each 100x200 image" in lines[0]
    assert "1 of 1 defect masks reach outside the crop (1 lie entirely outside)" in lines[0]
    assert "data.crop: null" in lines[0]


def test_a_square_image_with_its_defect_inside_the_crop_does_not_warn(tmp_path, caplog):
    root = _tree(tmp_path, (100, 100), mask_box=(40, 40, 60, 60))  # keeps 77%, mask central
    with caplog.at_level(logging.WARNING, logger="fedpatch.data"):
        load_records(DataConfig(root=str(root)), root, "part")
    assert not [r for r in caplog.records if "center-crop" in r.getMessage()]
    cov = coverage.crop_coverage(coverage.Preprocess(resize=256, crop=224), load_records(
        DataConfig(root=str(root)), root, "part"), "part")
    assert cov.kept == pytest.approx((224 / 256) ** 2, abs=0.01) and (cov.masks, cov.masks_cut) == (1, 0)


def test_a_square_image_whose_defect_reaches_the_border_warns(tmp_path, caplog):
    root = _tree(tmp_path, (100, 100), mask_box=(0, 0, 10, 10))  # top-left corner: outside the crop
    with caplog.at_level(logging.WARNING, logger="fedpatch.data"):
        load_records(DataConfig(root=str(root)), root, "part")
    (line,) = [r.getMessage() for r in caplog.records if "center-crop" in r.getMessage()]
    assert "1 of 1 defect masks reach outside the crop (0 lie entirely outside)" in line


def test_no_crop_means_no_warning(tmp_path, caplog):
    root = _tree(tmp_path, (100, 200))
    with caplog.at_level(logging.WARNING, logger="fedpatch.data"):
        load_records(DataConfig(root=str(root), resize=224, crop=None), root, "part")
    assert not [r for r in caplog.records if "center-crop" in r.getMessage()]


def test_hold_out_is_seeded_order_free_and_keeps_training_images(tmp_path):
    root = tmp_path
    cat = root / "part"
    for i in range(20):
        save_png(cat / "train" / "good" / f"{i:03d}.png")
    save_png(cat / "test" / "good" / "000.png")
    records = load_records(DataConfig(root=str(root)), root, "part")
    a = hold_out(records, 0.1, seed=3)
    b = hold_out(list(reversed(records)), 0.1, seed=3)
    held = sorted(str(r.path) for r in a if r.held_out)
    assert len(held) == 2 and held == sorted(str(r.path) for r in b if r.held_out)  # ceil(0.1 * 20)
    assert all(r.split == "validation" for r in a if r.held_out)
    assert held != sorted(str(r.path) for r in hold_out(records, 0.1, seed=4) if r.held_out)
    assert sum(r.split == "train" for r in hold_out(records, 0.99, seed=0)) == 1  # one always stays
    # a dataset with its own validation split is left alone
    save_png(cat / "validation" / "good" / "000.png")
    with_validation = load_records(DataConfig(root=str(root)), root, "part", holdout=0.1)
    assert not any(r.held_out for r in with_validation) and sum(r.split == "train" for r in with_validation) == 20


def test_f1_flag_all_is_the_reject_everything_f1():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # p = 5/8: precision 5/8, recall 1
    assert f1_flag_all(labels) == pytest.approx(2 * (5 / 8) / (1 + 5 / 8))
    metrics = evaluate(labels, np.arange(8.0))
    assert metrics["f1_flag_all"] == pytest.approx(10 / 13) and metrics["f1_max"] == 1.0


def test_metrics_without_masks_are_image_level_and_name_what_they_skip(tmp_path):
    from patchcore.data import ImageRecord

    records = [ImageRecord(path=tmp_path / f"{i}.png", category="c", label=i % 2, defect="good" if i % 2 == 0 else "x",
                           split="test") for i in range(6)]
    scored = ScoredSet(records, np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7]), np.zeros((6, 4, 4), np.float32),
                       np.zeros((6, 4, 4), bool), np.zeros(6, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" or any other numpy warning
        metrics = scored.metrics()
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert set(metrics["skipped"]) == {"pixel_auroc", "aupro"}
    assert "no ground-truth masks" in metrics["skipped"]["aupro"]


# --- layer weighting -------------------------------------------------------------------------

def test_concat_embedding_is_the_3x3_mean_aligned_and_concatenated():
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    emb, grid = embed_concat([a, b], 3)
    assert grid == (8, 8) and emb.shape == (2, 64, 10)
    # hand check at an interior and a corner position of layer 1: the mean of the 3x3 window
    # with zero padding counted (a corner sees 4 of 9 values)
    assert torch.allclose(emb[0, 3 * 8 + 5, :4], a[0, :, 2:5, 4:7].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(emb[1, 0, :4], a[1, :, :2, :2].sum(dim=(1, 2)) / 9, atol=1e-6)
    # layer 2: its own 3x3 mean on its 4x4 grid, then bilinearly resized to 8x8
    pooled = F.avg_pool2d(b, 3, 1, 1)
    up = F.interpolate(pooled, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(emb[:, :, 4:], up.flatten(2).transpose(1, 2), atol=1e-6)
    balanced, _ = embed_concat([a, b], 3, balanced=True)
    assert torch.allclose(balanced[..., :4], emb[..., :4] / 2, atol=1e-6)  # 1/sqrt(4)
    assert torch.allclose(balanced[..., 4:], emb[..., 4:] / 6 ** 0.5, atol=1e-6)
    assert torch.equal(embed([a, b], 3, weighting="balanced")[0], balanced)


def test_auto_weighting_concatenates_lite_channels_and_keeps_the_paper_for_resnets():
    lite = ModelConfig(backbone=BackboneConfig("efficientnet_lite0", ("layer2", "layer3"), "none"))
    wrn = ModelConfig()
    assert embedding_dim(lite) == 152 and backbone_id(lite).endswith(":d152:concat")
    assert embedding_dim(wrn) == 1024 and backbone_id(wrn) == "wide_resnet50_2:layer2+layer3:p3:d1024"
    lite2 = ModelConfig(backbone=BackboneConfig("efficientnet_lite2", ("layer2", "layer3"), "none"))
    assert embedding_dim(lite2) == 48 + 120


def test_a_bank_from_before_the_weighting_key_loads_with_the_paper_embedding(tmp_path):
    from patchcore.memory_bank import MemoryBank
    from patchcore.model import PatchCore

    config = ModelConfig(backbone=BackboneConfig("efficientnet_lite0", ("layer2", "layer3"), "none"),
                         layer_weighting="paper", target_embed_dim=64, pretrain_embed_dim=64)
    model = PatchCore(config, device="cpu")
    model.set_bank(torch.randn(5, 64))
    path, _ = model.bank.save(tmp_path / "old")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["metadata"]["model"]["layer_weighting"]  # as written before the key existed
    meta_path.write_text(json.dumps(meta))
    bank = MemoryBank.load(path)  # the sha256 covers the tensors, not the JSON sidecar
    rebuilt = PatchCore.from_bank(bank, device="cpu")
    assert rebuilt.weighting == "paper" and rebuilt.embed(torch.rand(1, 3, 64, 64))[0].shape[-1] == 64


# --- real data ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_hazelnut_bank_on_the_mvtec_layout_carries_a_threshold_and_predict_decides(tmp_path, capsys):
    if not (SHARED / "mvtec" / "hazelnut").is_dir():
        pytest.skip(f"shared images not found at {SHARED / 'mvtec' / 'hazelnut'}")
    from experiments.app.cli import main

    run = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "configs" / "shared_real.yaml"), "--category", "hazelnut",
                 "--data-root", str(SHARED / "mvtec"), "--set", "model.coreset.ratio=0.01", "--set", "device=cpu",
                 "--quiet", "--out", str(run)]) == 0
    meta = json.loads((run / "banks" / "hazelnut.json").read_text())["metadata"]
    assert meta["threshold"]["details"]["source"] == "held-out training normals"
    assert meta["num_train_images"] == 28 - 3  # ceil(0.1 x 28) held out
    defect = sorted(p for p in (SHARED / "mvtec" / "hazelnut" / "test").glob("[!g]*/*")
                    if p.suffix.lower() in (".png", ".jpg"))[0]
    capsys.readouterr()
    assert main(["predict", str(defect), "--bank", str(run / "banks" / "hazelnut.safetensors"),
                 "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reject" in out and "uncalibrated" not in out


@pytest.mark.slow
def test_autovi_engine_wiring_without_masks_evaluates_image_metrics_and_names_the_skipped(tmp_path, capsys):
    if not (SHARED / "autovi" / "engine_wiring").is_dir():
        pytest.skip("shared AutoVI engine_wiring absent")
    from experiments.app.cli import main

    config = tmp_path / "ew.yaml"
    config.write_text(
        f"data: {{format: autovi, root: {SHARED / 'autovi'}, categories: [engine_wiring], resize: 256, crop: null,\n"
        "       evaluate_at_original: true}\n"
        "model: {backbone: {name: efficientnet_lite0}, coreset: {ratio: 0.01}}\ndevice: cpu\n")
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--quiet", "--out", str(run)]) == 0  # require_masks left on
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "Mean of empty slice"
        assert main(["evaluate", "--run", str(run), "--quiet", "--overlays", "0", "--out", str(run / "eval")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "eval" / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    ew = metrics["engine_wiring"]
    assert ew["num_images"] == 607 and ew["image_auroc"] > 0.75  # measured 0.83 (Lite0, 1% coreset)
    assert ew["pixel_auroc"] is None and set(ew["skipped"]) == {"pixel_auroc", "aupro"}
    assert "engine_wiring: pixel_auroc skipped: no ground-truth masks" in out
    assert "for rejecting every image" in out and "held-out training normals" in out


def test_local_ratio_defaults_to_a_multiple_of_the_global_one(tmp_path):
    from federated.config import LOCAL_FACTOR, ExperimentConfig
    from patchcore.config import load_config
    from patchcore.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data: {format: synthetic}\nfederation: {global_ratio: 0.05}\n")
    config = load_config(path, ExperimentConfig)
    assert config.federation.local_ratio is None and config.federation.local == pytest.approx(LOCAL_FACTOR * 0.05)
    assert load_config(path, ExperimentConfig, {"federation.global_ratio": 0.6,
                                                "federation.local_factor": 2.0}).federation.local == 1.0  # capped
    assert load_config(path, ExperimentConfig, {"federation.local_ratio": 0.3}).federation.local == 0.3  # explicit wins
    with pytest.raises(ConfigError, match="federation.local_factor: must be >= 1"):
        load_config(path, ExperimentConfig, {"federation.local_factor": 0.5})
