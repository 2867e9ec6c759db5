"""MVTec AD and MVTec 3D-AD (RGB only) folder layouts -> `ImageRecord`s.

MVTec AD: `<root>/<category>/train/good/*`, optional `validation/good/*`, `test/<defect>/*`
(`good` = normal) and `ground_truth/<defect>/<stem>_mask.png`.
MVTec 3D-AD: the same splits with an `rgb/` folder under each `<defect>` (`xyz/` is ignored) and
the mask beside it in `test/<defect>/gt/<stem>.png`.

Loaders only list files (no pixel is read), return records in a sorted, machine-independent
order, and fail on the first layout problem with one line naming the folder or file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from patchcore.data.images import IMAGE_EXTENSIONS, list_images
from patchcore.data.records import GOOD, ImageRecord
from patchcore.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
_EXTENSIONS = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)

log = logging.getLogger("fedpatch.data")


def dataset_root(root: str | Path) -> Path:
    """`root` as an absolute path, or DataError when it is not an existing folder."""
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DataError(f"dataset root {path} does not exist: set data.root (or "
                        f"FEDPATCH_DATA_ROOT) to the folder that holds the category folders")
    if not path.is_dir():
        raise DataError(f"dataset root {path} is a file, not a folder")
    return path


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the category folders under `root` (those holding `train/` or `test/`)."""
    path = dataset_root(root)
    return [p.name for p in _visible_dirs(path)
            if (p / "train").is_dir() or (p / "test").is_dir()]


def category_dir(root: str | Path, category: str) -> Path:
    """`<root>/<category>` checked to exist; the error lists the categories that do."""
    path = dataset_root(root)
    folder = path / category
    if not category or not folder.is_dir():
        available = ", ".join(list_categories(path)) or "none"
        raise DataError(f"category folder {folder} not found; categories under {path}: "
                        f"{available}")
    return folder


def check_splits(splits: Iterable[str]) -> tuple[str, ...]:
    """The requested splits as a tuple, each one of SPLITS (no duplicates)."""
    splits = tuple(splits)
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    if len(set(splits)) != len(splits):
        raise ConfigError(f"splits {splits} repeat a split")
    return splits


@dataclass(frozen=True)
class _Layout:
    """Where a folder layout keeps images and masks."""

    name: str
    hint: str
    image_subdir: str | None  # "rgb" for MVTec 3D-AD: images live one level down

    def image_dir(self, defect_dir: Path) -> Path:
        return defect_dir / self.image_subdir if self.image_subdir else defect_dir

    def mask_candidates(self, category: Path, defect: str, image: Path) -> list[Path]:
        """Mask paths to try, first = the canonical one named in errors."""
        if self.image_subdir:
            gt = category / "test" / defect / "gt"
            return [gt / f"{image.stem}.png"] + [gt / f"{image.stem}{e}" for e in IMAGE_EXTENSIONS
                                                 if e != ".png"]
        gt = category / "ground_truth" / defect
        return [gt / f"{image.stem}_mask.png"] + [gt / f"{image.stem}_mask{e}"
                                                  for e in IMAGE_EXTENSIONS if e != ".png"]


MVTEC_AD = _Layout("MVTec AD", "expected <category>/train/good/*.png, <category>/test/<defect>/*"
                   " and <category>/ground_truth/<defect>/<stem>_mask.png", None)
MVTEC_3D = _Layout("MVTec 3D-AD", "expected <category>/train/good/rgb/*.png, "
                   "<category>/test/<defect>/rgb/*.png and <category>/test/<defect>/gt/*.png",
                   "rgb")


def _layout_mismatch(folder: Path, layout: _Layout) -> str:
    """A hint when the folder clearly follows the other MVTec layout."""
    if layout.image_subdir is None and (folder / "rgb").is_dir():
        return "; it looks like MVTec 3D-AD: use data.format mvtec3d"
    if layout.image_subdir is not None and list_images(folder):
        return "; it looks like MVTec AD: use data.format mvtec"
    return ""


def _good_records(category: Path, split: str, layout: _Layout) -> list[ImageRecord]:
    """Records of `<split>/good` (train or validation); the folder must exist and hold images."""
    good = category / split / GOOD
    if not good.is_dir():
        if split == "validation":
            raise DataError(f"no validation split: folder {good} does not exist; drop "
                            f"'validation' from the splits")
        raise DataError(f"{category} does not follow the {layout.name} layout: no folder {good}"
                        f" ({layout.hint})")
    images = list_images(layout.image_dir(good))
    if not images:
        raise DataError(f"empty category: no images ({_EXTENSIONS}) in "
                        f"{layout.image_dir(good)}{_layout_mismatch(good, layout)}")
    return [ImageRecord(path=p, category=category.name, label=0, defect=GOOD, split=split)
            for p in images]


def _find_mask(category: Path, defect: str, image: Path, layout: _Layout) -> Path | None:
    for candidate in layout.mask_candidates(category, defect, image):
        if candidate.is_file():
            return candidate
    return None


def _defect_records(category: Path, defect_dir: Path, layout: _Layout,
                    require_masks: bool) -> list[ImageRecord]:
    """Records of one `test/<defect>` folder; anomalous ones get their mask path."""
    defect = defect_dir.name
    image_dir = layout.image_dir(defect_dir)
    if layout.image_subdir and not image_dir.is_dir():
        raise DataError(f"{category} does not follow the {layout.name} layout: no folder "
                        f"{image_dir} ({layout.hint})")
    records = []
    for image in list_images(image_dir):
        masks: tuple[Path, ...] = ()
        if defect != GOOD:
            mask = _find_mask(category, defect, image, layout)
            if mask is None and require_masks:
                expected = layout.mask_candidates(category, defect, image)[0]
                raise DataError(f"anomalous test image {image} has no mask: expected {expected};"
                                f" add it or set data.require_masks: false")
            masks = (mask,) if mask is not None else ()
        records.append(ImageRecord(path=image, category=category.name, label=int(defect != GOOD),
                                   defect=defect, split="test", mask_paths=masks))
    return records


_LABELS_ONLY: set[Path] = set()


def masks_expected(category: Path, require_masks: bool) -> bool:
    """`require_masks`, unless the category has no `ground_truth` folder at all: its test images
    then carry image-level labels only (as the shared AutoVI engine_wiring), which is said once,
    and evaluation reports image metrics and names the pixel metrics it skips."""
    if not require_masks or (category / "ground_truth").is_dir():
        return require_masks
    if category not in _LABELS_ONLY:
        _LABELS_ONLY.add(category)
        log.warning("%s has no ground_truth folder: image-level labels only (pixel metrics will be skipped)",
                    category)
    return False


def _test_records(category: Path, layout: _Layout, require_masks: bool) -> list[ImageRecord]:
    """Records of `test/<defect>/`: good first, then defects by name."""
    if layout is MVTEC_AD:  # MVTec 3D-AD keeps its masks beside the images (test/<defect>/gt)
        require_masks = masks_expected(category, require_masks)
    test = category / "test"
    if not test.is_dir():
        raise DataError(f"{category} does not follow the {layout.name} layout: no folder {test}"
                        f" ({layout.hint})")
    defect_dirs = sorted(_visible_dirs(test), key=lambda p: (p.name != GOOD, p.name))
    records = [r for d in defect_dirs for r in _defect_records(category, d, layout, require_masks)]
    if not records:
        raise DataError(f"no test images in {test}: expected {test}/<defect>/ folders with "
                        f"images ({layout.hint})")
    return records


def _load(root: str | Path, category: str, splits: Iterable[str], require_masks: bool,
          layout: _Layout) -> list[ImageRecord]:
    splits = check_splits(splits)
    folder = category_dir(root, category)
    if not any((folder / s).is_dir() for s in SPLITS):
        raise DataError(f"{folder} does not follow the {layout.name} layout: it has no train/ "
                        f"or test/ folder ({layout.hint})")
    records: list[ImageRecord] = []
    for split in splits:
        if split == "test":
            records += _test_records(folder, layout, require_masks)
        else:
            records += _good_records(folder, split, layout)
    return records


def load_mvtec(root: str | Path, category: str, splits: Iterable[str] = ("train", "test"),
               require_masks: bool = True) -> list[ImageRecord]:
    """Records of one MVTec AD category, split by split in the order given.

    An anomalous test image without `ground_truth/<defect>/<stem>_mask.png` is an error when
    `require_masks`, else it gets `mask_paths=()` (image metrics only).
    """
    return _load(root, category, splits, require_masks, MVTEC_AD)


def load_mvtec3d_rgb(root: str | Path, category: str, splits: Iterable[str] = ("train", "test"),
                     require_masks: bool = True) -> list[ImageRecord]:
    """Records of one MVTec 3D-AD category, RGB images only (`xyz/` point clouds ignored)."""
    return _load(root, category, splits, require_masks, MVTEC_3D)


def has_validation(root: str | Path, category: str) -> bool:
    """True when the category has a `validation/good` folder (MVTec 3D-AD does, AD does not)."""
    return (category_dir(root, category) / "validation" / GOOD).is_dir()
