"""AutoVI (Renault automotive visual inspection, Carvalho et al. 2024) -> `ImageRecord`s.

Official layout (Zenodo record 10459003; loader and evaluation code of the authors):
`<root>/<category>/train/good/*.png`, `test/good/*.png`, `test/<defect>/*.png`,
`ground_truth/<defect>/<image stem>/<k>.png` with one PNG per defect region (the image's mask is
their union), and `<category>/defects_config.json`, a list of
`{defect_name, pixel_value, saturation_threshold, relative_saturation}` as in MVTec LOCO: a
region PNG's nonzero pixels carry its defect's `pixel_value`, which the AUC-sPRO metric uses to
find the saturation threshold. There is no validation split. Images are 400x400 (engine_wiring,
pipe_clip, pipe_staple) or 1000x750 W x H (tank_screw, underbody_pipes, underbody_screw), and
the official evaluation scores anomaly maps at that original resolution.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcore.data.images import list_images, read_array
from patchcore.data.mvtec import SPLITS, category_dir, check_splits, masks_expected
from patchcore.data.records import GOOD, ImageRecord
from patchcore.errors import DataError

AUTOVI_CATEGORIES = ("engine_wiring", "pipe_clip", "pipe_staple", "tank_screw",
                     "underbody_pipes", "underbody_screw")
AUTOVI_IMAGE_SIZES = {  # (W, H)
    "engine_wiring": (400, 400), "pipe_clip": (400, 400), "pipe_staple": (400, 400),
    "tank_screw": (1000, 750), "underbody_pipes": (1000, 750), "underbody_screw": (1000, 750),
}
_HINT = ("expected <category>/train/good/*.png, <category>/test/<defect>/*.png and "
         "<category>/ground_truth/<defect>/<image stem>/<region>.png")
_KEYS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")

DEFECTS_CONFIG = "defects_config.json"


@dataclass(frozen=True)
class DefectSpec:
    """One entry of defects_config.json.

    `saturation_threshold` is a fraction of the region's area in (0, 1] when
    `relative_saturation`, else an absolute pixel count.
    """

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec(entry: Any, index: int, path: Path) -> DefectSpec:
    """Validate one config entry; errors name the file, the entry and the key."""
    where = f"{path} entry {index}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object with keys {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in entry]
    if missing:
        raise DataError(f"{where} lacks key(s) {', '.join(missing)}")
    name, value = entry["defect_name"], entry["pixel_value"]
    threshold, relative = entry["saturation_threshold"], entry["relative_saturation"]
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: defect_name must be a non-empty string, got {name!r}")
    if not _is_int(value) or not 1 <= value <= 255:
        raise DataError(f"{where}: pixel_value must be an integer in 1..255, got {value!r}")
    if not isinstance(relative, bool):
        raise DataError(f"{where}: relative_saturation must be true or false, got {relative!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise DataError(f"{where}: saturation_threshold must be a number, got {threshold!r}")
    if relative and not 0 < threshold <= 1:
        raise DataError(f"{where}: a relative saturation_threshold must be in (0, 1], got "
                        f"{threshold}")
    if not relative and (threshold < 1 or float(threshold) != int(threshold)):
        raise DataError(f"{where}: an absolute saturation_threshold must be a whole number of "
                        f"pixels >= 1, got {threshold}")
    return DefectSpec(name, int(value), float(threshold) if relative else int(threshold),
                      relative)


def load_defects_config(root: str | Path, category: str) -> dict[str, DefectSpec]:
    """`<root>/<category>/defects_config.json` as {defect_name: DefectSpec}.

    Names and pixel values must be unique: a region mask is mapped to its defect by value.
    """
    path = category_dir(root, category) / DEFECTS_CONFIG
    if not path.is_file():
        raise DataError(f"defects config {path} not found: AutoVI categories ship one; copy it "
                        f"from the dataset archive")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"defects config {path} is not valid JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries:
        raise DataError(f"defects config {path} must be a non-empty JSON list of defect entries")
    specs: dict[str, DefectSpec] = {}
    values: dict[int, str] = {}
    for index, entry in enumerate(entries):
        spec = _spec(entry, index, path)
        if spec.name in specs:
            raise DataError(f"{path} entry {index}: defect_name {spec.name!r} is repeated")
        if spec.pixel_value in values:
            raise DataError(f"{path} entry {index}: pixel_value {spec.pixel_value} is already "
                            f"used by {values[spec.pixel_value]!r}")
        specs[spec.name] = spec
        values[spec.pixel_value] = spec.name
    return specs


def read_region(path: str | Path, specs: dict[str, DefectSpec],
                expected_size: tuple[int, int] | None = None) -> tuple[np.ndarray, DefectSpec]:
    """One region PNG -> ((H, W) bool mask, its DefectSpec), for AUC-sPRO.

    The defect is found by the pixel value of the first channel, as the official evaluation
    reads it; DataError when the value is not exactly one of the config's pixel values or the
    size differs from `expected_size` = (W, H).
    """
    path = Path(path)
    region = read_array(path)
    channel = region[..., 0] if region.ndim == 3 else region  # (H, W)
    if expected_size is not None and channel.shape[::-1] != tuple(expected_size):
        raise DataError(f"mask {path} is {channel.shape[1]}x{channel.shape[0]} (WxH) but its "
                        f"image is {expected_size[0]}x{expected_size[1]}")
    values = sorted(int(v) for v in np.unique(channel) if v != 0)
    by_value = {s.pixel_value: s for s in specs.values()}
    if len(values) != 1 or values[0] not in by_value:
        known = ", ".join(f"{s.pixel_value} ({s.name})" for s in specs.values())
        raise DataError(f"region mask {path} holds values {values}; expected exactly one of "
                        f"the defects_config pixel values: {known}")
    return channel != 0, by_value[values[0]]


def _regions(category: Path, defect: str, image: Path, require_masks: bool) -> tuple[Path, ...]:
    """All region PNGs of one anomalous image, sorted by name."""
    folder = category / "ground_truth" / defect / image.stem
    regions = tuple(p for p in list_images(folder) if p.suffix.lower() == ".png")
    if not regions and require_masks:
        state = "is empty" if folder.is_dir() else "does not exist"
        raise DataError(f"anomalous test image {image} has no mask: folder {folder} {state} "
                        f"(one PNG per defect region expected); add it or set "
                        f"data.require_masks: false")
    return regions


def _train_records(category: Path, split: str) -> list[ImageRecord]:
    good = category / split / GOOD
    if not good.is_dir():
        if split == "validation":
            raise DataError(f"no validation split: folder {good} does not exist (AutoVI has "
                            f"none); drop 'validation' from the splits")
        raise DataError(f"{category} does not follow the AutoVI layout: no folder {good} "
                        f"({_HINT})")
    images = list_images(good)
    if not images:
        raise DataError(f"empty category: no images in {good}")
    return [ImageRecord(path=p, category=category.name, label=0, defect=GOOD, split=split)
            for p in images]


def _test_records(category: Path, require_masks: bool) -> list[ImageRecord]:
    require_masks = masks_expected(category, require_masks)
    test = category / "test"
    if not test.is_dir():
        raise DataError(f"{category} does not follow the AutoVI layout: no folder {test} "
                        f"({_HINT})")
    defect_dirs = sorted((p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: (p.name != GOOD, p.name))
    records = []
    for defect_dir in defect_dirs:
        defect, label = defect_dir.name, int(defect_dir.name != GOOD)
        for image in list_images(defect_dir):
            masks = _regions(category, defect, image, require_masks) if label else ()
            records.append(ImageRecord(path=image, category=category.name, label=label,
                                       defect=defect, split="test", mask_paths=masks))
    if not records:
        raise DataError(f"no test images in {test}: expected {test}/<defect>/*.png")
    return records


def load_autovi(root: str | Path, category: str, splits: Iterable[str] = ("train", "test"),
                require_masks: bool = True) -> list[ImageRecord]:
    """Records of one AutoVI category; an anomalous image's `mask_paths` are all its region PNGs.

    With `require_masks=False` an anomalous image without regions gets `mask_paths=()`.
    """
    splits = check_splits(splits)
    folder = category_dir(root, category)
    if not any((folder / s).is_dir() for s in SPLITS):
        raise DataError(f"{folder} does not follow the AutoVI layout: it has no train/ or test/"
                        f" folder ({_HINT})")
    records: list[ImageRecord] = []
    for split in splits:
        records += (_test_records(folder, require_masks) if split == "test"
                    else _train_records(folder, split))
    return records
