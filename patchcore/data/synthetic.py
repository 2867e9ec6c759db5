"""Synthetic factories: procedural products with painted defects, written in the MVTec AD layout.

Offline and seeded, so every test, CI run and default config has data. Four products: `stripes`
(wood grain), `grid` (wire mesh), `dots` (leather with pores) and `disc` (a bottle seen from
above). Each normal image varies a little (shift, rotation, texture phase, colour gain, noise)
so that normal is a distribution, not one picture. Defects (scratch, crack, stain, hole, missing
piece; three per product) are painted with hard edges before the photometric jitter, which is
shared with the clean image: the mask is exactly the set of changed pixels. Each image has its
own random stream (seed, product, split, index), so adding images or products never changes the
ones already written, and the same seed gives byte-identical PNGs.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from patchcore.errors import ConfigError, DataError

SYNTHETIC_CATEGORIES = ("stripes", "grid", "dots", "disc")
DEFECTS = {
    "stripes": ("scratch", "stain", "crack"),
    "grid": ("hole", "crack", "stain"),
    "dots": ("stain", "hole", "scratch"),
    "disc": ("missing", "scratch", "stain"),
}
MARKER = "synthetic.json"
GENERATOR = "fedpatch.synthetic"
VERSION = 1  # bump when rendering changes: old datasets then count as made with other parameters
AREA_RANGE = (0.005, 0.05)  # fraction of the image a defect covers
_SPLIT_CODES = {"train": 0, "good": 1, "defect": 2}


@dataclass(frozen=True)
class Scene:
    """A rendered normal product before photometric jitter; float32 in [0, 1]."""

    image: np.ndarray  # (H, W, 3)
    anchor: np.ndarray  # (H, W) bool: where a defect may be centred
    support: np.ndarray  # (H, W) bool: where a defect may paint (the object)
    background: np.ndarray | None = None  # (H, W, 3): what a missing piece reveals
    center: tuple[float, float] = (0.0, 0.0)  # (x, y) of the object
    radius: float = 0.0


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # (H, W, 3) uint8, with the defect (if any)
    clean: np.ndarray  # (H, W, 3) uint8, the same image without it
    mask: np.ndarray  # (H, W) bool, exactly the changed pixels


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (H, W) float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def _frame(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Coordinates in the product's own frame: shifted by <= 3% and rotated by <= 4 degrees."""
    cx, cy = (float(c) for c in size / 2 + rng.uniform(-0.03, 0.03, size=2) * size)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    xs, ys = _grid(size)
    dx, dy = xs - cx, ys - cy
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return cos * dx + sin * dy, -sin * dx + cos * dy, cx, cy


def _lerp(dark: tuple[float, ...], light: tuple[float, ...], t: np.ndarray) -> np.ndarray:
    dark_a, light_a = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return dark_a + (light_a - dark_a) * np.clip(t, 0, 1)[..., None]  # (H, W, 3)


def _border_anchor(size: int) -> np.ndarray:
    xs, ys = _grid(size)
    margin = 0.15 * size
    return (xs > margin) & (xs < size - margin) & (ys > margin) & (ys < size - margin)


def _stripes(size: int, rng: np.random.Generator) -> Scene:
    u, v, _, _ = _frame(size, rng)
    period = size / rng.uniform(9.0, 11.0)
    wave = rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * u / (0.7 * size) + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * v / period + wave + rng.uniform(0, 2 * np.pi)
    grain = 0.5 + 0.35 * np.sin(phase) + 0.1 * np.sin(3.1 * phase + rng.uniform(0, 2 * np.pi))
    image = _lerp((0.45, 0.30, 0.18), (0.80, 0.62, 0.42), grain)
    return Scene(image, _border_anchor(size), np.ones((size, size), bool))


def _mesh(size: int, rng: np.random.Generator) -> Scene:
    u, v, _, _ = _frame(size, rng)
    period = size / 8 * rng.uniform(0.97, 1.03)
    near = np.minimum(np.abs(np.sin(np.pi * u / period)), np.abs(np.sin(np.pi * v / period)))
    wire = 1.0 / (1.0 + (near / 0.18) ** 4)
    image = _lerp((0.25, 0.28, 0.32), (0.78, 0.78, 0.74), wire)
    return Scene(image, _border_anchor(size), np.ones((size, size), bool))


def _leather(size: int, rng: np.random.Generator) -> Scene:
    blotch = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 20)
    blotch /= blotch.std() + 1e-8
    pores = ndimage.gaussian_filter((rng.random((size, size)) < 0.02).astype(np.float64), 0.7)
    pores /= pores.max() + 1e-8
    tone = (0.55 + 0.12 * blotch - 0.45 * pores).astype(np.float32)
    image = _lerp((0.32, 0.20, 0.14), (0.66, 0.46, 0.33), tone)
    return Scene(image, _border_anchor(size), np.ones((size, size), bool))


def _disc(size: int, rng: np.random.Generator) -> Scene:
    u, v, cx, cy = _frame(size, rng)
    radius = 0.30 * size * rng.uniform(0.98, 1.02)
    r = np.sqrt(u * u + v * v) / radius
    _, ys = _grid(size)
    background = _lerp((0.16, 0.18, 0.20), (0.24, 0.26, 0.28), ys / size)
    shade = 0.55 + 0.35 * (1 - r * r) - 0.25 * (np.abs(r - 0.62) < 0.035)
    shade += 0.3 * np.exp(-((u - 0.35 * radius) ** 2 + (v + 0.35 * radius) ** 2)
                          / (2 * (0.12 * radius) ** 2))
    body = _lerp((0.0, 0.0, 0.0), (0.42, 0.78, 0.55), shade)
    support = r <= 1.0
    image = np.where(support[..., None], body, background).astype(np.float32)
    return Scene(image, r <= 0.55, support, background, (cx, cy), radius)


_SCENES: dict[str, Callable[[int, np.random.Generator], Scene]] = {
    "stripes": _stripes, "grid": _mesh, "dots": _leather, "disc": _disc}


def _polyline_mask(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """(H, W) bool: pixels within width/2 of the polyline through `points` (K, 2) as (x, y)."""
    xs, ys = _grid(size)
    start, delta = points[:-1, :, None, None], np.diff(points, axis=0)[:, :, None, None]
    length2 = np.maximum((delta ** 2).sum(axis=1), 1e-8)  # (K-1, 1, 1)
    t = ((xs - start[:, 0]) * delta[:, 0] + (ys - start[:, 1]) * delta[:, 1]) / length2
    t = np.clip(t, 0, 1)  # (K-1, H, W)
    dist2 = (xs - start[:, 0] - t * delta[:, 0]) ** 2 + (ys - start[:, 1] - t * delta[:, 1]) ** 2
    return dist2.min(axis=0) <= (width / 2) ** 2


def _blob_mask(center: np.ndarray, radii: tuple[float, float], size: int,
               rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: a rotated ellipse with a wobbly outline."""
    xs, ys = _grid(size)
    angle, wobble = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    dx, dy = xs - center[0], ys - center[1]
    a = np.cos(angle) * dx + np.sin(angle) * dy
    b = -np.sin(angle) * dx + np.cos(angle) * dy
    polar = np.arctan2(b, a)
    edge = 1.0 + 0.15 * np.sin(3 * polar + wobble)
    return (a / radii[0]) ** 2 + (b / radii[1]) ** 2 <= edge ** 2


def _pick(anchor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random (x, y) pixel centre inside `anchor`."""
    index = rng.choice(np.flatnonzero(anchor))
    return np.array([index % anchor.shape[1] + 0.5, index // anchor.shape[1] + 0.5])


def _shape(kind: str, scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one defect region of `kind`, (H, W) bool, limited to the scene's support."""
    center = _pick(scene.anchor, rng)
    if kind == "scratch":
        angle, half = rng.uniform(0, np.pi), rng.uniform(0.15, 0.225) * size
        step = half * np.array([np.cos(angle), np.sin(angle)])
        mask = _polyline_mask(np.stack([center - step, center + step]), max(2.0, size / 48), size)
    elif kind == "crack":
        steps = 6
        angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-0.6, 0.6, steps))
        seg = rng.uniform(0.35, 0.5) * size / steps
        moves = seg * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points = center + np.concatenate([[[0.0, 0.0]], np.cumsum(moves, axis=0)])
        mask = _polyline_mask(points - moves.sum(0) / 2, max(2.0, size / 56), size)
    elif kind == "stain":
        mask = _blob_mask(center, tuple(rng.uniform(0.05, 0.085, 2) * size), size, rng)
    elif kind == "hole":
        radius = rng.uniform(0.045, 0.065) * size
        mask = _blob_mask(center, (radius, radius), size, rng)
    elif kind == "missing":
        angle = rng.uniform(0, 2 * np.pi)
        rim = np.array(scene.center) + scene.radius * np.array([np.cos(angle), np.sin(angle)])
        bite = rng.uniform(0.09, 0.12) * size
        mask = _blob_mask(rim, (bite, bite), size, rng)
    else:
        raise ConfigError(f"unknown synthetic defect {kind!r}")
    return mask & scene.support


def _paint(kind: str, scene: Scene, mask: np.ndarray) -> np.ndarray:
    """The scene's image with `mask` painted as defect `kind` (changes only masked pixels)."""
    image = scene.image
    if kind == "scratch":
        painted = 0.35 * image + 0.65 * np.float32([0.97, 0.96, 0.92])
    elif kind == "crack":
        painted = 0.2 * image
    elif kind == "stain":
        painted = 0.3 * image + 0.7 * np.float32([0.32, 0.10, 0.45])
    elif kind == "hole":
        painted = np.broadcast_to(np.float32([0.03, 0.03, 0.04]), image.shape)
    else:  # missing: the background shows through
        painted = scene.background
    return np.where(mask[..., None], painted, image)  # unmasked pixels: bit-identical


def _photometric(size: int, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A colour gain, brightness offset and sensor noise, drawn once, applied to any image."""
    gain = rng.uniform(0.95, 1.05, 3).astype(np.float32)
    offset = np.float32(rng.uniform(-0.03, 0.03))
    noise = rng.normal(0.0, 0.012, (size, size, 3)).astype(np.float32)

    def apply(image: np.ndarray) -> np.ndarray:
        out = image * gain + offset + noise
        return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)

    return apply


def render_sample(category: str, defect: str | None, size: int,
                  rng: np.random.Generator) -> SyntheticSample:
    """One image of `category`, with `defect` painted (None: normal; mask all False)."""
    if category not in _SCENES:
        raise ConfigError(f"unknown synthetic category {category!r}: use "
                          f"{', '.join(SYNTHETIC_CATEGORIES)}")
    if defect is not None and defect not in DEFECTS[category]:
        raise ConfigError(f"synthetic {category} has no defect {defect!r}: use "
                          f"{', '.join(DEFECTS[category])}")
    scene = _SCENES[category](size, rng)
    finish = _photometric(size, rng)
    clean = finish(scene.image)
    if defect is None:
        return SyntheticSample(clean, clean, np.zeros((size, size), bool))
    for _ in range(100):  # redraw until the area is in range; deterministic given rng
        mask = _shape(defect, scene, size, rng)
        if AREA_RANGE[0] <= mask.mean() <= AREA_RANGE[1]:
            break
    else:
        raise RuntimeError(f"could not draw a {defect} of {AREA_RANGE} area at size {size}")
    return SyntheticSample(finish(_paint(defect, scene, mask)), clean, mask)


def image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one image (`split`: "train", "good" = test good, "defect"), so any
    written image can be rendered again together with its clean twin."""
    key = [seed, zlib.crc32(category.encode()), _SPLIT_CODES[split], index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write atomically (temp file + rename): concurrent generators never expose half a file."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def _plan(category: str, params: dict[str, int]) -> list[tuple[str, str, int, Path]]:
    """(split, defect or "good", stream index, relative image path) for every image."""
    digits = max(3, len(str(max(params["n_train"], params["n_test_defect"],
                                params["n_test_good"]))))
    plan = [("train", "good", i, Path(category, "train", "good", f"{i:0{digits}d}.png"))
            for i in range(params["n_train"])]
    plan += [("good", "good", i, Path(category, "test", "good", f"{i:0{digits}d}.png"))
             for i in range(params["n_test_good"])]
    kinds, counts = DEFECTS[category], dict.fromkeys(DEFECTS[category], 0)
    for i in range(params["n_test_defect"]):
        kind = kinds[i % len(kinds)]
        name = f"{counts[kind]:0{digits}d}.png"
        plan.append(("defect", kind, i, Path(category, "test", kind, name)))
        counts[kind] += 1
    return plan


def _mask_path(image: Path) -> Path:
    category, _, defect, name = image.parts
    return Path(category, "ground_truth", defect, f"{Path(name).stem}_mask.png")


def _write_category(root: Path, category: str, params: dict[str, int]) -> None:
    for split, defect, index, relative in _plan(category, params):
        rng = image_rng(params["seed"], category, split, index)
        sample = render_sample(category, None if defect == "good" else defect,
                               params["size"], rng)
        _write_png(root / relative, sample.image)
        if defect != "good":
            _write_png(root / _mask_path(relative), sample.mask.astype(np.uint8) * 255)


def _is_complete(root: Path, category: str, params: dict[str, int]) -> bool:
    for _, defect, _, relative in _plan(category, params):
        if not (root / relative).is_file():
            return False
        if defect != "good" and not (root / _mask_path(relative)).is_file():
            return False
    return True


def _check_params(categories: tuple[str, ...], params: dict[str, int]) -> None:
    unknown = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
    if unknown or not categories:
        raise ConfigError(f"data.synthetic.categories: unknown or empty {unknown or categories}; "
                          f"choose from {', '.join(SYNTHETIC_CATEGORIES)}")
    for key in ("n_train", "n_test_good", "n_test_defect"):
        if params[key] < 1:
            raise ConfigError(f"data.synthetic.{key} must be >= 1, got {params[key]}")
    if not 32 <= params["size"] <= 2048:
        raise ConfigError(f"data.synthetic.size must be in 32..2048, got {params['size']}")


def _read_marker(marker: Path, params: dict[str, int]) -> set[str]:
    """Categories the marker records as complete; DataError if made with other parameters."""
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        made_with = content["params"]
        done = set(content["categories"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"synthetic marker {marker} is unreadable ({exc}): delete its folder "
                        f"and generate again") from exc
    expected = {"generator": GENERATOR, "version": VERSION, **params}
    found = {"generator": content.get("generator"), "version": content.get("version"),
             **made_with}
    if found != expected:
        diff = ", ".join(f"{k}={found.get(k)!r} (now {v!r})" for k, v in expected.items()
                         if found.get(k) != v)
        raise DataError(f"{marker.parent} holds a synthetic dataset made with other parameters "
                        f"({diff}): choose another folder or delete this one")
    return done


def _write_marker(marker: Path, params: dict[str, int], done: Iterable[str]) -> None:
    content = {"generator": GENERATOR, "version": VERSION, "params": params,
               "categories": sorted(done)}
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def make_synthetic_dataset(root: str | Path,
                           categories: Iterable[str] = SYNTHETIC_CATEGORIES,
                           n_train: int = 30, n_test_good: int = 8, n_test_defect: int = 12,
                           size: int = 128, seed: int = 0) -> Path:
    """Write (or reuse) a synthetic dataset in the MVTec AD layout under `root`; returns root.

    Idempotent: `root/synthetic.json` records the parameters and the finished categories; a
    call with the same parameters only writes categories that are missing or incomplete. A root
    made with other parameters, or a non-synthetic folder in the way, is a DataError.
    """
    categories = tuple(categories)
    params = {"n_train": int(n_train), "n_test_good": int(n_test_good),
              "n_test_defect": int(n_test_defect), "size": int(size), "seed": int(seed)}
    _check_params(categories, params)
    path = Path(root).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise DataError(f"synthetic dataset root {path} is a file, not a folder")
    marker = path / MARKER
    if marker.is_file():
        done = _read_marker(marker, params)
    else:
        clash = [path / c for c in categories if (path / c).exists()]
        if clash:
            raise DataError(f"{clash[0]} already exists but {marker} does not: choose an empty "
                            f"folder for the synthetic dataset")
        path.mkdir(parents=True, exist_ok=True)
        done = set()
        _write_marker(marker, params, done)
    for category in categories:
        if category in done and _is_complete(path, category, params):
            continue
        _write_category(path, category, params)
        done = _read_marker(marker, params) | {category}  # keep what a concurrent run added
        _write_marker(marker, params, done)
    return path
