"""Synthetic factories: MVTec AD layout, byte-identical determinism, masks that are exactly the
painted defects, visible but modest defect sizes, natural variation, and idempotence."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.data import (
    DEFECTS,
    SYNTHETIC_CATEGORIES,
    ImageDataset,
    Preprocess,
    image_rng,
    load_mvtec,
    make_synthetic_dataset,
    render_sample,
)
from patchcore.errors import ConfigError, DataError

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defect": 3, "size": 64}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default dataset (4 products x 50 images at 128 px), generated once."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def test_layout_loads_as_mvtec_ad(default_root: Path) -> None:
    for category in SYNTHETIC_CATEGORIES:
        records = load_mvtec(default_root, category)
        assert Counter(r.split for r in records) == {"train": 30, "test": 20}
        defects = Counter(r.defect for r in records if r.label)
        assert set(defects) == set(DEFECTS[category]) and sum(defects.values()) == 12
        assert all(len(r.mask_paths) == 1 for r in records if r.label)
        image = Image.open(records[0].path)
        assert image.size == (128, 128) and image.mode == "RGB"
    item = ImageDataset(records[-1:], Preprocess(resize=128, crop=112))[0]
    assert item["image"].shape == (3, 112, 112) and item["mask"].sum() > 0


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = digests(make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL))
    second = digests(make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL))
    other = digests(make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL))
    assert first == second and len(first) == 4 * (4 + 2 + 3 + 3)
    assert first.keys() == other.keys() and first != other


def test_images_do_not_depend_on_how_many_are_made(tmp_path: Path) -> None:
    small = digests(make_synthetic_dataset(tmp_path / "a", categories=("disc",), **SMALL))
    more = dict(SMALL, n_train=6, n_test_defect=5)
    large = digests(make_synthetic_dataset(tmp_path / "b", categories=("grid", "disc"), **more))
    for name in ("disc/train/good/003.png", "disc/test/good/001.png",
                 "disc/test/missing/000.png", "disc/ground_truth/missing/000_mask.png"):
        assert small[name] == large[name]


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_mask_is_exactly_the_painted_defect(category: str) -> None:
    for seed in range(4):
        for defect in DEFECTS[category]:
            sample = render_sample(category, defect, 128, np.random.default_rng(seed))
            changed = np.abs(sample.image.astype(int) - sample.clean.astype(int)).sum(axis=2)
            assert not changed[~sample.mask].any(), f"{category}/{defect} leaks outside"
            assert 0.005 <= sample.mask.mean() <= 0.05, f"{category}/{defect} area"
            visible = changed[sample.mask] > 20  # summed over RGB, of 765
            assert visible.mean() > 0.9, f"{category}/{defect} not visible enough"
            assert changed[sample.mask].mean() > 60


def test_written_files_are_the_rendered_samples(default_root: Path) -> None:
    """Each defect PNG and its mask on disk are the sample rendered from the image's stream, so
    the mask on disk is exactly the painted defect."""
    for category in SYNTHETIC_CATEGORIES:
        for index in range(len(DEFECTS[category])):  # defect i goes to folder DEFECTS[i % k]
            defect = DEFECTS[category][index]
            sample = render_sample(category, defect, 128, image_rng(0, category, "defect", index))
            image = np.asarray(Image.open(default_root / category / "test" / defect / "000.png"))
            mask = np.asarray(Image.open(
                default_root / category / "ground_truth" / defect / "000_mask.png"))
            assert np.array_equal(image, sample.image)
            assert np.array_equal(mask, sample.mask * np.uint8(255))


def test_normal_images_vary(default_root: Path) -> None:
    for category in SYNTHETIC_CATEGORIES:
        folder = default_root / category / "train" / "good"
        first, second = (np.asarray(Image.open(folder / f"00{i}.png"), float) for i in (0, 1))
        assert np.abs(first - second).mean() > 2.0


def test_idempotent_and_extends_categories(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "s", categories=("stripes",), **SMALL)
    image = root / "stripes" / "train" / "good" / "000.png"
    stamp = image.stat().st_mtime_ns
    make_synthetic_dataset(root, categories=("stripes",), **SMALL)
    assert image.stat().st_mtime_ns == stamp
    make_synthetic_dataset(root, categories=("stripes", "dots"), **SMALL)
    assert image.stat().st_mtime_ns == stamp and (root / "dots" / "train" / "good").is_dir()
    marker = json.loads((root / "synthetic.json").read_text())
    assert marker["categories"] == ["dots", "stripes"] and marker["params"]["size"] == 64
    missing = root / "dots" / "test" / "hole" / "000.png"
    missing.unlink()
    make_synthetic_dataset(root, categories=("dots",), **SMALL)
    assert missing.is_file() and image.stat().st_mtime_ns == stamp


def test_other_parameters_or_foreign_folder_are_errors(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "s", categories=("grid",), **SMALL)
    with pytest.raises(DataError, match="other parameters.*seed=0 \\(now 1\\)"):
        make_synthetic_dataset(root, categories=("grid",), **dict(SMALL, seed=1))
    (tmp_path / "mine" / "grid").mkdir(parents=True)
    with pytest.raises(DataError, match="mine/grid already exists"):
        make_synthetic_dataset(tmp_path / "mine", categories=("grid",), **SMALL)
    with pytest.raises(ConfigError, match="hexagons"):
        make_synthetic_dataset(tmp_path / "x", categories=("hexagons",))
    with pytest.raises(ConfigError, match="n_test_defect"):
        make_synthetic_dataset(tmp_path / "x", n_test_defect=0)
