"""Every bad input fails with one DataError line naming the file or folder; odd but valid
inputs (RGBA, 16-bit, grayscale masks) read correctly."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.data import (
    ImageDataset,
    ImageRecord,
    Preprocess,
    load_autovi,
    load_defects_config,
    load_mvtec,
    load_mvtec3d_rgb,
    read_image,
    read_mask,
    read_region,
    union_mask,
)
from patchcore.errors import ConfigError, DataError
from tests.test_data_loaders import (
    DEFECTS_CONFIG,
    make_autovi_tree,
    make_mvtec3d_tree,
    make_mvtec_tree,
    save_png,
)


@contextmanager
def raises_one_line(exc: type[Exception], *names: object) -> Iterator[None]:
    """Expect `exc` with a one-line message containing every str(name)."""
    with pytest.raises(exc) as info:
        yield
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, f"{name} not in: {message}"


def png16(path: Path, array: np.ndarray) -> Path:
    """Encode a (H, W, C) uint16 array as a 16-bit PNG (PIL cannot write 48-bit RGB)."""
    height, width, channels = array.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def noisy_rgb(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- roots, categories, layouts -----------------------------------------------------------

def test_missing_root(tmp_path: Path) -> None:
    with raises_one_line(DataError, tmp_path / "nowhere", "does not exist"):
        load_mvtec(tmp_path / "nowhere", "widget")


def test_missing_category_lists_available(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "widget")
    with raises_one_line(DataError, tmp_path / "bottle", "widget"):
        load_mvtec(tmp_path, "bottle")


def test_wrong_layout_no_train_good(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path)
    (tmp_path / "widget" / "train" / "good").rename(tmp_path / "widget" / "train" / "ok")
    with raises_one_line(DataError, tmp_path / "widget" / "train" / "good", "layout"):
        load_mvtec(tmp_path, "widget")


def test_wrong_layout_no_test_folder(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path)
    (tmp_path / "widget" / "test").rename(tmp_path / "widget" / "testing")
    with raises_one_line(DataError, tmp_path / "widget" / "test", "layout"):
        load_mvtec(tmp_path, "widget")
    assert len(load_mvtec(tmp_path, "widget", splits=("train",))) == 3


def test_wrong_layout_no_split_folders(tmp_path: Path) -> None:
    save_png(tmp_path / "widget" / "images" / "000.png")
    with raises_one_line(DataError, tmp_path / "widget", "no train/ or test/"):
        load_mvtec(tmp_path, "widget")


def test_3d_tree_read_as_mvtec_ad_gets_a_hint(tmp_path: Path) -> None:
    make_mvtec3d_tree(tmp_path)
    with raises_one_line(DataError, tmp_path / "cookie" / "train" / "good", "mvtec3d"):
        load_mvtec(tmp_path, "cookie")
    make_mvtec_tree(tmp_path)
    with raises_one_line(DataError, tmp_path / "widget" / "train" / "good", "format mvtec"):
        load_mvtec3d_rgb(tmp_path, "widget")


def test_empty_category(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path)
    for image in (tmp_path / "widget" / "train" / "good").iterdir():
        image.unlink()
    with raises_one_line(DataError, "empty category", tmp_path / "widget" / "train" / "good"):
        load_mvtec(tmp_path, "widget")


def test_missing_validation_and_unknown_split(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path)
    with raises_one_line(DataError, tmp_path / "widget" / "validation" / "good"):
        load_mvtec(tmp_path, "widget", splits=("validation",))
    with raises_one_line(ConfigError, "'val'"):
        load_mvtec(tmp_path, "widget", splits=("val",))


def test_image_without_its_mask(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path)
    mask = tmp_path / "widget" / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    image = tmp_path / "widget" / "test" / "crack" / "001.png"
    with raises_one_line(DataError, image, mask, "require_masks"):
        load_mvtec(tmp_path, "widget")


def test_3d_image_without_its_mask(tmp_path: Path) -> None:
    make_mvtec3d_tree(tmp_path)
    mask = tmp_path / "cookie" / "test" / "hole" / "gt" / "001.png"
    mask.unlink()
    with raises_one_line(DataError, tmp_path / "cookie" / "test" / "hole" / "rgb" / "001.png",
                         mask):
        load_mvtec3d_rgb(tmp_path, "cookie")


# --- pixels --------------------------------------------------------------------------------

def test_corrupt_image(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"this is not a png at all")
    with raises_one_line(DataError, path, "corrupt"):
        read_image(path)


def test_truncated_image(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(noisy_rgb(), "RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with raises_one_line(DataError, path, "truncated"):
        read_image(path)
    record = ImageRecord(path, "c", 0, "good", "train")
    with raises_one_line(DataError, path):
        ImageDataset([record])[0]


def test_missing_image_file(tmp_path: Path) -> None:
    with raises_one_line(DataError, tmp_path / "gone.png", "not found"):
        read_image(tmp_path / "gone.png")


def test_mask_of_the_wrong_size(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path)
    mask = tmp_path / "widget" / "ground_truth" / "dent" / "000_mask.png"
    save_png(mask, size=(20, 15), value=255, mode="L")
    image = tmp_path / "widget" / "test" / "dent" / "000.png"
    record = [r for r in load_mvtec(tmp_path, "widget") if r.path == image][0]
    with raises_one_line(DataError, mask, image, "20x15", "40x30"):
        ImageDataset([record])[0]
    with raises_one_line(DataError, mask, "20x15", "40x30"):
        read_mask(mask, expected_size=(40, 30))


def test_rgba_image_equals_its_rgb(tmp_path: Path) -> None:
    rgb = noisy_rgb()
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), rgb)


def test_gray_alpha_and_palette_images(tmp_path: Path) -> None:
    gray = noisy_rgb()[:, :, 0]
    Image.fromarray(np.dstack([gray, gray]), "LA").save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "la.png")), np.dstack([gray] * 3))
    Image.fromarray(noisy_rgb()).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").mode == "RGB"
    Image.fromarray(gray > 128).save(tmp_path / "bits.png")
    bits = np.asarray(read_image(tmp_path / "bits.png"))
    assert set(np.unique(bits)) <= {0, 255} and bits.shape == (*gray.shape, 3)


def test_sixteen_bit_gray_equals_eight_bit_within_one(tmp_path: Path) -> None:
    gray8 = noisy_rgb()[:, :, 0]
    gray16 = (gray8.astype(np.uint32) * 257 + np.random.default_rng(2).integers(
        -128, 128, gray8.shape)).clip(0, 65535).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = np.asarray(read_image(tmp_path / "g16.png")).astype(int)
    assert image.shape == (*gray8.shape, 3)
    assert np.abs(image - gray8[:, :, None]).max() <= 1


def test_sixteen_bit_rgb_equals_eight_bit_within_one(tmp_path: Path) -> None:
    rgb8 = noisy_rgb()
    png16(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    image = np.asarray(read_image(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(image - rgb8).max() <= 1


def test_masks_of_any_mode_become_0_255(tmp_path: Path) -> None:
    truth = np.zeros((30, 40), dtype=bool)
    truth[5:9, 10:20] = True
    png16(tmp_path / "m16.png", (truth * 1).astype(np.uint16)[:, :, None])  # value 1 of 65535
    Image.fromarray(truth).save(tmp_path / "m1.png")
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[truth, 0] = 254
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mrgba.png")
    for name in ("m16.png", "m1.png", "mrgba.png"):
        mask = read_mask(tmp_path / name, expected_size=(40, 30))
        assert mask.mode == "L" and np.array_equal(np.asarray(mask), truth * np.uint8(255))
    union = np.asarray(union_mask([tmp_path / "m1.png", tmp_path / "mrgba.png"], (40, 30)))
    assert np.array_equal(union > 0, truth)


# --- AutoVI --------------------------------------------------------------------------------

def test_autovi_image_without_regions(tmp_path: Path) -> None:
    make_autovi_tree(tmp_path)
    folder = tmp_path / "engine_wiring" / "ground_truth" / "missing" / "0000"
    for region in folder.iterdir():
        region.unlink()
    image = tmp_path / "engine_wiring" / "test" / "missing" / "0000.png"
    with raises_one_line(DataError, image, folder, "empty"):
        load_autovi(tmp_path, "engine_wiring")
    records = load_autovi(tmp_path, "engine_wiring", require_masks=False)
    assert [r.mask_paths for r in records if r.label] == [()]


def test_autovi_has_no_validation(tmp_path: Path) -> None:
    make_autovi_tree(tmp_path)
    with raises_one_line(DataError, tmp_path / "engine_wiring" / "validation" / "good"):
        load_autovi(tmp_path, "engine_wiring", splits=("train", "validation"))


@pytest.mark.parametrize("content, words", [
    (None, ["not found"]),
    ("{not json", ["not valid JSON"]),
    (json.dumps({"defect_name": "x"}), ["non-empty JSON list"]),
    (json.dumps([{"defect_name": "x", "pixel_value": 255}]), ["entry 0", "saturation_threshold"]),
    (json.dumps([dict(DEFECTS_CONFIG[0], pixel_value=300)]), ["entry 0", "pixel_value"]),
    (json.dumps([dict(DEFECTS_CONFIG[0], saturation_threshold=1.5)]), ["(0, 1]"]),
    (json.dumps([dict(DEFECTS_CONFIG[1], saturation_threshold=0.5)]), ["whole number"]),
    (json.dumps([DEFECTS_CONFIG[0], dict(DEFECTS_CONFIG[1], pixel_value=255)]),
     ["entry 1", "already used"]),
])
def test_defects_config_errors_name_the_file(tmp_path: Path, content: str | None,
                                             words: list[str]) -> None:
    make_autovi_tree(tmp_path)
    path = tmp_path / "engine_wiring" / "defects_config.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with raises_one_line(DataError, path, *words):
        load_defects_config(tmp_path, "engine_wiring")


def test_region_with_unknown_pixel_value(tmp_path: Path) -> None:
    make_autovi_tree(tmp_path)
    specs = load_defects_config(tmp_path, "engine_wiring")
    region = tmp_path / "engine_wiring" / "ground_truth" / "missing" / "0000" / "000.png"
    array = np.asarray(Image.open(region)).copy()
    array[array > 0] = 7
    Image.fromarray(array).save(region)
    with raises_one_line(DataError, region, "[7]", "255 (missing)"):
        read_region(region, specs)


def test_bad_preprocess_settings() -> None:
    with raises_one_line(ConfigError, "crop"):
        Preprocess(resize=200, crop=224)
    with raises_one_line(ConfigError, "resize"):
        Preprocess(resize=0)
    with raises_one_line(ConfigError, "std"):
        Preprocess(std=(0.2, 0.0, 0.2))
