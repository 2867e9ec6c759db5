"""Loaders on fixture trees in the exact MVTec AD, MVTec 3D-AD and AutoVI layouts, the dataset
and its preprocessing geometry, and record counts on the shared real images (skipped if absent)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.data import (
    AUTOVI_IMAGE_SIZES,
    DefectSpec,
    ImageDataset,
    ImageRecord,
    Preprocess,
    has_validation,
    list_categories,
    load_autovi,
    load_defects_config,
    load_mvtec,
    load_mvtec3d_rgb,
    make_loader,
    read_region,
)
from patchcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import SHARED_MVTEC

REAL_ROOT = SHARED_MVTEC


def save_png(path: Path, size: tuple[int, int] = (40, 30), value: int = 100,
             box: tuple[int, int, int, int] | None = None, mode: str = "RGB") -> Path:
    """A flat image of `size` = (W, H); `box` = (top, left, bottom, right) painted 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    array = np.full(shape, value, dtype=np.uint8)
    if box is not None:
        top, left, bottom, right = box
        array[top:bottom, left:right] = 255
    Image.fromarray(array, mode).save(path)
    return path


def make_mvtec_tree(root: Path, category: str = "widget", validation: bool = False) -> Path:
    """train/good 3 images (mixed extension case), test good 2 + crack 2 + dent 1, masks."""
    cat = root / category
    for name in ("000.png", "001.PNG", "002.jpg"):
        save_png(cat / "train" / "good" / name)
    (cat / "train" / "good" / ".hidden.png").write_bytes(b"ignored")
    (cat / "train" / "good" / "notes.txt").write_text("ignored")
    if validation:
        save_png(cat / "validation" / "good" / "000.png")
    for name in ("000.png", "001.png"):
        save_png(cat / "test" / "good" / name)
    for defect, names in (("crack", ("000.png", "001.png")), ("dent", ("000.png",))):
        for name in names:
            save_png(cat / "test" / defect / name)
            stem = Path(name).stem
            save_png(cat / "ground_truth" / defect / f"{stem}_mask.png", value=0,
                     box=(5, 5, 10, 10), mode="L")
    return root


def make_mvtec3d_tree(root: Path, category: str = "cookie") -> Path:
    cat = root / category
    for split in ("train", "validation"):
        for i in range(2):
            save_png(cat / split / "good" / "rgb" / f"{i:03d}.png")
            (cat / split / "good" / "xyz").mkdir(parents=True, exist_ok=True)
            (cat / split / "good" / "xyz" / f"{i:03d}.tiff").write_bytes(b"xyz data")
    for defect in ("good", "hole"):
        for i in range(2):
            save_png(cat / "test" / defect / "rgb" / f"{i:03d}.png")
            save_png(cat / "test" / defect / "gt" / f"{i:03d}.png", value=0, mode="L",
                     box=None if defect == "good" else (1, 1, 4, 4))
    return root


DEFECTS_CONFIG = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0,
     "relative_saturation": True},
    {"defect_name": "fastening", "pixel_value": 254, "saturation_threshold": 800,
     "relative_saturation": False},
]


def make_autovi_tree(root: Path, category: str = "engine_wiring", n_regions: int = 2) -> Path:
    """The official AutoVI layout at the category's real image size."""
    size = AUTOVI_IMAGE_SIZES[category]
    cat = root / category
    (cat).mkdir(parents=True, exist_ok=True)
    (cat / "defects_config.json").write_text(json.dumps(DEFECTS_CONFIG))
    for i in range(2):
        save_png(cat / "train" / "good" / f"{i:04d}.png", size=size)
        save_png(cat / "test" / "good" / f"{i:04d}.png", size=size)
    save_png(cat / "test" / "missing" / "0000.png", size=size)
    for k in range(n_regions):  # RGB region PNGs carrying the defect's pixel value
        region = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        top, left = size[1] // 2 - 60 + 40 * k, size[0] // 2 - 20  # inside the center crop
        region[top:top + 20, left:left + 40] = 255
        path = cat / "ground_truth" / "missing" / "0000" / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(region, "RGB").save(path)
    return root


def test_mvtec_layout_records_in_sorted_order(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, validation=True)
    records = load_mvtec(root, "widget", splits=("train", "validation", "test"))
    assert [(r.split, r.defect, r.path.name) for r in records] == [
        ("train", "good", "000.png"), ("train", "good", "001.PNG"), ("train", "good", "002.jpg"),
        ("validation", "good", "000.png"),
        ("test", "good", "000.png"), ("test", "good", "001.png"),
        ("test", "crack", "000.png"), ("test", "crack", "001.png"), ("test", "dent", "000.png"),
    ]
    for record in records:
        assert record.path.is_absolute() and record.category == "widget"
        assert record.label == int(record.defect != "good")
        if record.label:
            assert record.mask_paths == (
                root / "widget" / "ground_truth" / record.defect / f"{record.path.stem}_mask.png",)
        else:
            assert record.mask_paths == ()
    assert list_categories(root) == ["widget"]
    assert has_validation(root, "widget")
    assert load_mvtec(root, "widget") == [r for r in records if r.split != "validation"]


def test_mvtec_without_masks_when_not_required(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path)
    (root / "widget" / "ground_truth" / "dent" / "000_mask.png").unlink()
    records = load_mvtec(root, "widget", splits=("test",), require_masks=False)
    dent = [r for r in records if r.defect == "dent"]
    assert len(dent) == 1 and dent[0].mask_paths == () and dent[0].label == 1


def test_mvtec3d_rgb_layout(tmp_path: Path) -> None:
    root = make_mvtec3d_tree(tmp_path)
    records = load_mvtec3d_rgb(root, "cookie", splits=("train", "validation", "test"))
    assert Counter(r.split for r in records) == {"train": 2, "validation": 2, "test": 4}
    assert all(r.path.parent.name == "rgb" for r in records)
    for record in records:
        expected = ((record.path.parent.parent / "gt" / record.path.name,)
                    if record.label else ())
        assert record.mask_paths == expected


def test_autovi_layout_both_image_sizes(tmp_path: Path) -> None:
    root = make_autovi_tree(tmp_path, "engine_wiring")
    make_autovi_tree(tmp_path, "tank_screw", n_regions=3)
    small = load_autovi(root, "engine_wiring")
    large = load_autovi(root, "tank_screw")
    assert Counter(r.defect for r in small) == {"good": 4, "missing": 1}
    anomalous = [r for r in large if r.label == 1]
    assert len(anomalous) == 1 and [p.name for p in anomalous[0].mask_paths] == [
        "000.png", "001.png", "002.png"]
    dataset = ImageDataset(large, Preprocess(resize=256, crop=224))
    item = dataset[len(large) - 1]
    assert item["image"].shape == (3, 224, 224) and item["has_mask"]
    assert item["original_size"].tolist() == [750, 1000]
    assert item["mask"].sum() > 0
    full = dataset.preprocess.invert_to_original(item["mask"][0], (750, 1000))
    assert full.shape == (750, 1000)


def test_defects_config_and_region_lookup(tmp_path: Path) -> None:
    root = make_autovi_tree(tmp_path)
    specs = load_defects_config(root, "engine_wiring")
    assert specs == {"missing": DefectSpec("missing", 255, 1.0, True),
                     "fastening": DefectSpec("fastening", 254, 800, False)}
    record = [r for r in load_autovi(root, "engine_wiring") if r.label][0]
    mask, spec = read_region(record.mask_paths[0], specs, expected_size=(400, 400))
    assert spec.name == "missing" and mask.shape == (400, 400) and mask.sum() == 20 * 40


def test_grayscale_image_gives_three_channels(tmp_path: Path) -> None:
    path = save_png(tmp_path / "gray.png", size=(50, 60), value=77, mode="L")
    record = ImageRecord(path=path, category="x", label=0, defect="good", split="train")
    item = ImageDataset([record], Preprocess(resize=32, crop=None))[0]
    assert item["image"].shape == (3, 38, 32)
    assert torch.allclose(item["image"][0] * 0.229 + 0.485, torch.tensor(77 / 255), atol=1e-3)
    assert item["has_mask"] is True  # good images: the all-zero mask is their ground truth


@pytest.mark.parametrize("size", [(300, 400), (400, 300)])
def test_dataset_shapes_and_loader(tmp_path: Path, size: tuple[int, int]) -> None:
    image = save_png(tmp_path / "test" / "cut" / "000.png", size=size)
    mask = save_png(tmp_path / "gt" / "000_mask.png", size=size, value=0, box=(0, 0, 5, 5),
                    mode="L")
    records = [ImageRecord(image, "c", 1, "cut", "test", (mask,)),
               ImageRecord(image, "c", 1, "cut", "test"),
               ImageRecord(image, "c", 0, "good", "test")]
    dataset = ImageDataset(records, Preprocess(resize=256, crop=224))
    item = dataset[0]
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 224, 224) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert Preprocess().output_size(*size) == (224, 224)
    batch = next(iter(make_loader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 224, 224) and batch["mask"].shape == (3, 1, 224, 224)
    assert batch["label"].tolist() == [1, 1, 0] and batch["index"].tolist() == [0, 1, 2]
    assert batch["has_mask"].tolist() == [True, False, True]
    assert batch["mask"][1:].sum() == 0


def test_mask_lands_where_the_painted_square_lands(tmp_path: Path) -> None:
    """A square painted into image and mask: after resize 256 + crop 224 of a 300x400 image,
    the mask covers exactly the bright pixels, at the analytically expected place."""
    box = (180, 120, 220, 160)  # top, left, bottom, right in a 300 (W) x 400 (H) image
    image = save_png(tmp_path / "img.png", size=(300, 400), value=20, box=box)
    mask = save_png(tmp_path / "mask.png", size=(300, 400), value=0, box=box, mode="L")
    preprocess = Preprocess(resize=256, crop=224)
    item = ImageDataset([ImageRecord(image, "c", 1, "d", "test", (mask,))], preprocess)[0]
    bright = item["image"][0] * 0.229 + 0.485 > 0.5  # (224, 224)
    painted = item["mask"][0] > 0
    assert (bright ^ painted).sum() <= 0.1 * painted.sum()
    scale = 256 / 300  # resized frame is 341 (h) x 256 (w); crop top = round((341-224)/2) = 58
    assert preprocess.resized_size(300, 400) == (341, 256)
    ys, xs = torch.nonzero(painted, as_tuple=True)
    assert abs(ys.float().mean() - (200 * scale - 58)) < 1.5
    assert abs(xs.float().mean() - (140 * scale - 16)) < 1.5


def test_invert_to_original_round_trip() -> None:
    preprocess = Preprocess(resize=256, crop=224)
    mask = np.zeros((400, 300), dtype=np.uint8)
    mask[180:220, 120:160] = 255
    small = preprocess.mask(Image.fromarray(mask, "L"))[0].float()  # (224, 224)
    back = preprocess.invert_to_original(small, (400, 300)) > 0.5  # (400, 300)
    truth = torch.from_numpy(mask > 0)
    assert (back & truth).sum() / (back | truth).sum() > 0.85
    constant = preprocess.invert_to_original(torch.full((2, 224, 224), 3.0), (400, 300))
    assert constant.shape == (2, 400, 300) and torch.allclose(constant, torch.tensor(3.0))


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (1024, 1024), (257, 511)])
def test_image_preprocessing_is_the_official_pil_pipeline_bit_for_bit(size: tuple[int, int]) -> None:
    # the official code: torchvision Resize(256) + CenterCrop(224) + ToTensor + Normalize on a PIL image
    from torchvision import transforms

    official = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)  # noise: every resampling difference shows
    image = Image.fromarray(pixels, "RGB")
    ours = Preprocess(resize=256, crop=224).image(image)
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, official(image))


def test_pair_transform_applies_to_its_domain_only(tmp_path: Path) -> None:
    image = save_png(tmp_path / "img.png", size=(64, 64), value=10, box=(0, 0, 64, 8))
    flip = lambda img, m: (img.transpose(Image.FLIP_LEFT_RIGHT),  # noqa: E731
                           None if m is None else m.transpose(Image.FLIP_LEFT_RIGHT))
    records = [ImageRecord(image, "c", 0, "good", "train", domain=d) for d in ("a", "b", None)]
    dataset = ImageDataset(records, Preprocess(resize=64, crop=None), {"a": flip})
    left_bright = [bool(dataset[i]["image"][0, 0, 0] > 1.0) for i in range(3)]
    assert left_bright == [False, True, True]


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason=f"shared images not found at {REAL_ROOT}")
def test_real_mvtec_counts() -> None:
    assert {"tire", "hazelnut"} <= set(list_categories(REAL_ROOT))
    tire = load_mvtec(REAL_ROOT, "tire", splits=("train", "validation", "test"))
    assert Counter(r.split for r in tire) == {"train": 210, "validation": 29, "test": 112}
    anomalous = [r for r in tire if r.label == 1]
    assert len(anomalous) == 87 and all(len(r.mask_paths) == 1 for r in anomalous)
    hazelnut = load_mvtec(REAL_ROOT, "hazelnut")
    assert Counter(r.split for r in hazelnut) == {"train": 28, "test": 23}
    assert sum(bool(r.mask_paths) for r in hazelnut) == 17
    item = ImageDataset(anomalous[:1])[0]
    assert item["image"].shape == (3, 224, 224) and item["mask"].sum() > 0
