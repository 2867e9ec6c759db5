"""Synthetic factories: procedural products with painted defects, written in the MVTec AD layout.

Offline and seeded, so every test, CI run and default config has data. Four products: `stripes`
(wood grain), `grid` (wire mesh), `dots` (leather with pores) and `disc` (a bottle seen from
above). Each normal image varies a little (shift, rotation, texture phase, colour gain, noise)
so that normal is a distribution, not one picture. Defects (scratch, crack, stain, hole, missing
piece; three per product) are painted with hard edges before the photometric jitter, which is
shared with the clean image: the mask is exactly the set of changed pixels. Each image has its
own random stream (seed, product, split, index), so adding images or products never changes the
ones already written, and the same seed gives byte-identical PNGs.

`Difficulty` makes the factories harder (the offline demo's configs/default.yaml sets it): fainter
and smaller defects, material lots (palettes), grain/shape variation and rare normal features
(knots in wood, a print on the cap, welds, creases), and per-image lighting (lamp gain, colour
temperature, gradient, vignette, highlight direction). Its defaults are the classic rendering,
byte for byte; a non-default difficulty is recorded in the dataset's parameters (marker and cache
hash) with STYLE_VERSION.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

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
STYLE_VERSION = 1  # bump when the non-classic (Difficulty) rendering changes; recorded with it
AREA_RANGE = (0.005, 0.05)  # fraction of the image a defect covers
_SPLIT_CODES = {"train": 0, "good": 1, "defect": 2}


@dataclass(frozen=True)
class Difficulty:
    """How hard the factories are; the defaults are the classic rendering (byte-identical)."""

    defect_contrast: float = 1.0  # share of the classic defect's colour change painted, (0, 1]
    defect_size: float = 1.0  # scale of defect lengths and radii, [0.3, 1.5]
    texture_variation: float = 0.0  # [0, 1]: material lots, grain/shape spread, rare normal features
    lighting_variation: float = 0.0  # [0, 1]: per-image lamp gain, colour, gradient, vignette

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, float(getattr(self, f.name)))
        checks = [("defect_contrast", 0.0 < self.defect_contrast <= 1.0, "in (0, 1]"),
                  ("defect_size", 0.3 <= self.defect_size <= 1.5, "in [0.3, 1.5]"),
                  ("texture_variation", 0.0 <= self.texture_variation <= 1.0, "in [0, 1]"),
                  ("lighting_variation", 0.0 <= self.lighting_variation <= 1.0, "in [0, 1]")]
        for key, ok, bounds in checks:
            if not ok:
                raise ConfigError(f"data.synthetic.{key} must be {bounds}, got {getattr(self, key)}")

    @property
    def is_classic(self) -> bool:
        return self == Difficulty()

    def params(self) -> dict[str, float | int]:
        """What a dataset records of it: {} when classic (old datasets and hashes stay valid)."""
        return {} if self.is_classic else {**asdict(self), "style_version": STYLE_VERSION}


@dataclass(frozen=True)
class Look:
    """One image's draw of normal variation under a non-classic Difficulty."""

    mix: float  # how far the palette moves from the classic one to the lot's, [0, 1]
    lot: Lot  # the material lot (one of the product's _LOTS)
    scale: float  # period / radius factor
    turn: float  # extra rotation, degrees
    shift: float  # extra position spread, fraction of the size
    feature: tuple[float, ...] | None  # a rare normal feature's (x, y, size, angle) or None
    light_angle: float  # radians: where the lamp sits (disc highlight direction)
    light: np.ndarray | None  # (H, W, 3) multiplicative lighting field, or None


@dataclass(frozen=True)
class Lot:
    """A material lot / product variant: what varies between batches of one product."""

    dark: tuple[float, float, float]
    light: tuple[float, float, float]
    scale: float = 1.0  # period (stripes, grid) or radius (disc) factor
    turn: float = 0.0  # grain / mesh rotation, degrees
    wave: float = 1.0  # stripes: waviness factor
    ring: float = 0.62  # disc: radius of the moulded ring (fraction of the radius); 0: none
    knurl: bool = False  # disc: a ribbed rim


# Lots per product, classic first; drawn uniformly. A factory that built a few parts has seen a
# few lots: the normal variation a small factory's bank misses.
_LOTS: dict[str, tuple[Lot, ...]] = {
    "stripes": (Lot((0.45, 0.30, 0.18), (0.80, 0.62, 0.42)),  # oak
                Lot((0.30, 0.19, 0.12), (0.62, 0.44, 0.30), scale=0.7, wave=1.6),  # walnut
                Lot((0.60, 0.47, 0.30), (0.93, 0.82, 0.62), scale=1.5, wave=0.5),  # pine
                Lot((0.50, 0.24, 0.16), (0.84, 0.52, 0.38), turn=25.0),  # cherry
                Lot((0.55, 0.50, 0.42), (0.86, 0.82, 0.74), scale=0.6, turn=-20.0, wave=0.8),  # ash
                Lot((0.40, 0.16, 0.10), (0.70, 0.36, 0.22), scale=1.25, turn=10.0, wave=2.0)),
    "grid": (Lot((0.25, 0.28, 0.32), (0.78, 0.78, 0.74)),
             Lot((0.14, 0.14, 0.17), (0.80, 0.68, 0.40), scale=0.8),
             Lot((0.32, 0.30, 0.26), (0.90, 0.90, 0.92), scale=1.25, turn=45.0),
             Lot((0.20, 0.26, 0.22), (0.62, 0.70, 0.66), turn=15.0),
             Lot((0.30, 0.22, 0.18), (0.85, 0.60, 0.45), scale=0.65),
             Lot((0.10, 0.12, 0.16), (0.55, 0.58, 0.62), scale=1.4, turn=-10.0)),
    "dots": (Lot((0.32, 0.20, 0.14), (0.66, 0.46, 0.33)),
             Lot((0.13, 0.11, 0.10), (0.36, 0.31, 0.28)),
             Lot((0.50, 0.36, 0.22), (0.86, 0.69, 0.50)),
             Lot((0.30, 0.12, 0.12), (0.62, 0.28, 0.26)),
             Lot((0.20, 0.24, 0.30), (0.45, 0.52, 0.62)),
             Lot((0.38, 0.34, 0.22), (0.72, 0.68, 0.48))),
    "disc": (Lot((0.0, 0.0, 0.0), (0.42, 0.78, 0.55)),  # green, one ring
             Lot((0.0, 0.0, 0.0), (0.40, 0.58, 0.86), scale=0.88, ring=0.45),  # blue
             Lot((0.0, 0.0, 0.0), (0.88, 0.64, 0.30), knurl=True),  # amber, ribbed
             Lot((0.0, 0.0, 0.0), (0.82, 0.82, 0.80), scale=1.1, ring=0.78),  # white
             Lot((0.0, 0.0, 0.0), (0.86, 0.32, 0.28), ring=0.0, knurl=True),  # red, plain
             Lot((0.0, 0.0, 0.0), (0.45, 0.45, 0.50), scale=0.95, ring=0.30)),  # grey
}

_FEATURE_P = 0.25  # chance of a rare normal feature (knot, print, weld, crease) at texture_variation 1


def draw_look(category: str, size: int, difficulty: Difficulty,
              rng: np.random.Generator) -> Look:
    """One image's lot, shape spread, rare feature and lighting; deterministic given rng."""
    tv, lv = difficulty.texture_variation, difficulty.lighting_variation
    draws = rng.uniform(-1.0, 1.0, 12)  # a fixed number of draws, whatever the settings
    lot = int(rng.integers(len(_LOTS[category])))
    has_feature = rng.random() < _FEATURE_P * tv
    feature = (float(rng.uniform(0.2, 0.8) * size), float(rng.uniform(0.2, 0.8) * size),
               float(rng.uniform(0.05, 0.09) * size), float(rng.uniform(0, np.pi)))
    xs, ys = _grid(size)
    x, y = xs / size * 2 - 1, ys / size * 2 - 1  # [-1, 1]
    phi = np.pi * draws[5]
    ramp = (np.cos(phi) * x + np.sin(phi) * y) / np.sqrt(2)
    field = ((1.0 + 0.3 * lv * abs(draws[6]) * ramp)  # gradient
             * (1.0 - 0.3 * lv * abs(draws[7]) * (x * x + y * y) / 2))  # vignette
    colour = np.float32([1 + 0.08 * lv * draws[8], 1.0, 1 - 0.08 * lv * draws[8]])
    light = (np.exp(0.2 * lv * draws[9]) * field[..., None] * colour).astype(np.float32)
    kind = _LOTS[category][lot]
    return Look(mix=tv, lot=kind, scale=float(kind.scale ** tv * np.exp(0.08 * tv * draws[0])),
                turn=float(tv * (kind.turn + 6.0 * draws[1])), shift=float(0.03 * tv * abs(draws[2])),
                feature=feature if has_feature else None,
                light_angle=float(-np.pi / 4 + 0.5 * np.pi * lv * draws[10]),
                light=light if lv > 0 else None)


def _palette(category: str, look: Look | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    classic = _LOTS[category][0]
    if look is None:
        return classic.dark, classic.light
    dark, light = ((a + look.mix * (b - a) for a, b in zip(getattr(classic, k), getattr(look.lot, k)))
                   for k in ("dark", "light"))
    return tuple(float(v) for v in dark), tuple(float(v) for v in light)


def _feature_field(look: Look | None, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(d, along): distance to the rare feature's centre and signed distance along its axis, in
    units of its size; None without one."""
    if look is None or look.feature is None:
        return None
    fx, fy, fs, fa = look.feature
    xs, ys = _grid(size)
    dx, dy = (xs - fx) / fs, (ys - fy) / fs
    return np.sqrt(dx * dx + dy * dy), np.cos(fa) * dx + np.sin(fa) * dy


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


def _frame(size: int, rng: np.random.Generator,
           look: Look | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Coordinates in the product's own frame: shifted by <= 3% and rotated by <= 4 degrees
    (classic; a Look widens both)."""
    cx, cy = (float(c) for c in size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
              * (1.0 if look is None else 1.0 + look.shift / 0.03))
    angle = np.deg2rad(rng.uniform(-4.0, 4.0) + (0.0 if look is None else look.turn))
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


def _stripes(size: int, rng: np.random.Generator, look: Look | None = None) -> Scene:
    u, v, _, _ = _frame(size, rng, look)
    period = size / rng.uniform(9.0, 11.0) * (1.0 if look is None else look.scale)
    wave = rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * u / (0.7 * size) + rng.uniform(0, 2 * np.pi))
    if look is not None:
        wave = wave * (1.0 + look.mix * (look.lot.wave - 1.0))
    phase = 2 * np.pi * v / period + wave + rng.uniform(0, 2 * np.pi)
    knot = _feature_field(look, size)
    if knot is not None:  # a knot: the grain bends around a dark, ringed core
        d, _ = knot
        phase = phase + 3.0 * np.exp(-d * d / 4.5)
    grain = 0.5 + 0.35 * np.sin(phase) + 0.1 * np.sin(3.1 * phase + rng.uniform(0, 2 * np.pi))
    if knot is not None:
        grain = grain - 0.45 * np.exp(-d * d) + 0.12 * np.sin(6 * d) * np.exp(-d * d / 2.25)
    image = _lerp(*_palette("stripes", look), grain)
    return Scene(image, _border_anchor(size), np.ones((size, size), bool))


def _mesh(size: int, rng: np.random.Generator, look: Look | None = None) -> Scene:
    u, v, _, _ = _frame(size, rng, look)
    period = size / 8 * rng.uniform(0.97, 1.03) * (1.0 if look is None else look.scale)
    near = np.minimum(np.abs(np.sin(np.pi * u / period)), np.abs(np.sin(np.pi * v / period)))
    wire = 1.0 / (1.0 + (near / 0.18) ** 4)
    weld = _feature_field(look, size)
    if weld is not None:  # a bright solder blob on the mesh
        wire = np.maximum(wire, 1.1 * np.exp(-(weld[0] / 0.45) ** 2))
    image = _lerp(*_palette("grid", look), wire)
    return Scene(image, _border_anchor(size), np.ones((size, size), bool))


def _leather(size: int, rng: np.random.Generator, look: Look | None = None) -> Scene:
    blotch = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 20)
    blotch /= blotch.std() + 1e-8
    pores = ndimage.gaussian_filter((rng.random((size, size)) < 0.02).astype(np.float64), 0.7)
    pores /= pores.max() + 1e-8
    tone = (0.55 + 0.12 * blotch - 0.45 * pores).astype(np.float32)
    crease = _feature_field(look, size)
    if crease is not None:  # a soft crease: a dark line along the feature's axis
        d, along = crease
        across = np.sqrt(np.maximum(d * d - along * along, 0.0))
        tone = tone - 0.25 * np.exp(-(across / 0.12) ** 2) * (np.abs(along) < 2.5)
    image = _lerp(*_palette("dots", look), tone)
    return Scene(image, _border_anchor(size), np.ones((size, size), bool))


def _disc(size: int, rng: np.random.Generator, look: Look | None = None) -> Scene:
    u, v, cx, cy = _frame(size, rng, look)
    radius = 0.30 * size * rng.uniform(0.98, 1.02) * (1.0 if look is None else look.scale)
    r = np.sqrt(u * u + v * v) / radius
    _, ys = _grid(size)
    background = _lerp((0.16, 0.18, 0.20), (0.24, 0.26, 0.28), ys / size)
    if look is None:
        shade = 0.55 + 0.35 * (1 - r * r) - 0.25 * (np.abs(r - 0.62) < 0.035)
    else:
        ring = look.lot.ring
        shade = 0.55 + 0.35 * (1 - r * r) - 0.25 * (ring > 0) * (np.abs(r - ring) < 0.035)
        if look.lot.knurl:  # ribs around the rim
            ribs = np.cos(48 * np.arctan2(v, u)) > 0.3
            shade = shade - 0.18 * (ribs & (r > 0.88))
    hx, hy = ((0.35, -0.35) if look is None else
              (0.495 * np.cos(look.light_angle), 0.495 * np.sin(look.light_angle)))
    shade += 0.3 * np.exp(-((u - hx * radius) ** 2 + (v - hy * radius) ** 2)
                          / (2 * (0.12 * radius) ** 2))
    if look is not None and look.feature is not None:  # an embossed logo: a ring near the centre
        fx, fy, fs, _ = look.feature
        ox, oy = (fx / size - 0.5) * radius, (fy / size - 0.5) * radius  # within 0.3 radius
        d = np.sqrt((u - ox) ** 2 + (v - oy) ** 2) / (0.6 * fs)
        shade = shade + 0.2 * np.exp(-((d - 1.0) / 0.25) ** 2) * (r < 0.55)
    body = _lerp(*_palette("disc", look), shade)
    support = r <= 1.0
    image = np.where(support[..., None], body, background).astype(np.float32)
    return Scene(image, r <= 0.55, support, background, (cx, cy), radius)


_SCENES: dict[str, Callable[[int, np.random.Generator, Look | None], Scene]] = {
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


def _shape(kind: str, scene: Scene, size: int, rng: np.random.Generator,
           scale: float = 1.0) -> np.ndarray:
    """Draw one defect region of `kind`, (H, W) bool, limited to the scene's support; `scale`
    multiplies lengths and radii."""
    center = _pick(scene.anchor, rng)
    if kind == "scratch":
        angle, half = rng.uniform(0, np.pi), rng.uniform(0.15, 0.225) * size * scale
        step = half * np.array([np.cos(angle), np.sin(angle)])
        mask = _polyline_mask(np.stack([center - step, center + step]), max(2.0, size / 48), size)
    elif kind == "crack":
        steps = 6
        angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-0.6, 0.6, steps))
        seg = rng.uniform(0.35, 0.5) * size / steps * scale
        moves = seg * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points = center + np.concatenate([[[0.0, 0.0]], np.cumsum(moves, axis=0)])
        mask = _polyline_mask(points - moves.sum(0) / 2, max(2.0, size / 56), size)
    elif kind == "stain":
        mask = _blob_mask(center, tuple(rng.uniform(0.05, 0.085, 2) * size * scale), size, rng)
    elif kind == "hole":
        radius = rng.uniform(0.045, 0.065) * size * scale
        mask = _blob_mask(center, (radius, radius), size, rng)
    elif kind == "missing":
        angle = rng.uniform(0, 2 * np.pi)
        rim = np.array(scene.center) + scene.radius * np.array([np.cos(angle), np.sin(angle)])
        bite = rng.uniform(0.09, 0.12) * size * scale
        mask = _blob_mask(rim, (bite, bite), size, rng)
    else:
        raise ConfigError(f"unknown synthetic defect {kind!r}")
    return mask & scene.support


def _paint(kind: str, scene: Scene, mask: np.ndarray, contrast: float = 1.0) -> np.ndarray:
    """The scene's image with `mask` painted as defect `kind` (changes only masked pixels);
    `contrast` < 1 paints that share of the change."""
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
    if contrast != 1.0:
        painted = image + np.float32(contrast) * (painted - image)
    return np.where(mask[..., None], painted, image)  # unmasked pixels: bit-identical


def _photometric(size: int, rng: np.random.Generator,
                 light: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A colour gain, brightness offset and sensor noise, drawn once, applied to any image
    (after the lighting field `light`, (H, W, 3), when given)."""
    gain = rng.uniform(0.95, 1.05, 3).astype(np.float32)
    offset = np.float32(rng.uniform(-0.03, 0.03))
    noise = rng.normal(0.0, 0.012, (size, size, 3)).astype(np.float32)

    def apply(image: np.ndarray) -> np.ndarray:
        out = (image if light is None else image * light) * gain + offset + noise
        return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)

    return apply


def render_sample(category: str, defect: str | None, size: int,
                  rng: np.random.Generator,
                  difficulty: Difficulty | None = None) -> SyntheticSample:
    """One image of `category`, with `defect` painted (None: normal; mask all False);
    `difficulty` None or classic: the classic rendering."""
    if category not in _SCENES:
        raise ConfigError(f"unknown synthetic category {category!r}: use "
                          f"{', '.join(SYNTHETIC_CATEGORIES)}")
    if defect is not None and defect not in DEFECTS[category]:
        raise ConfigError(f"synthetic {category} has no defect {defect!r}: use "
                          f"{', '.join(DEFECTS[category])}")
    d = difficulty or Difficulty()
    look = None if d.is_classic else draw_look(category, size, d, rng)
    scene = _SCENES[category](size, rng, look)
    finish = _photometric(size, rng, None if look is None else look.light)
    clean = finish(scene.image)
    if defect is None:
        return SyntheticSample(clean, clean, np.zeros((size, size), bool))
    area = (AREA_RANGE[0] * min(1.0, d.defect_size) ** 2, AREA_RANGE[1])
    for _ in range(100):  # redraw until the area is in range; deterministic given rng
        mask = _shape(defect, scene, size, rng, d.defect_size)
        if area[0] <= mask.mean() <= area[1]:
            break
    else:
        raise RuntimeError(f"could not draw a {defect} of {area} area at size {size}")
    image = finish(_paint(defect, scene, mask, d.defect_contrast))
    if not d.is_classic:  # a faint change can round away: the mask stays the changed pixels
        mask = mask & np.any(image != clean, axis=-1)
    return SyntheticSample(image, clean, mask)


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


def _plan(category: str, params: dict[str, Any]) -> list[tuple[str, str, int, Path]]:
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


def _write_category(root: Path, category: str, params: dict[str, Any],
                    difficulty: Difficulty) -> None:
    for split, defect, index, relative in _plan(category, params):
        rng = image_rng(params["seed"], category, split, index)
        sample = render_sample(category, None if defect == "good" else defect,
                               params["size"], rng, difficulty)
        _write_png(root / relative, sample.image)
        if defect != "good":
            _write_png(root / _mask_path(relative), sample.mask.astype(np.uint8) * 255)


def _is_complete(root: Path, category: str, params: dict[str, Any]) -> bool:
    for _, defect, _, relative in _plan(category, params):
        if not (root / relative).is_file():
            return False
        if defect != "good" and not (root / _mask_path(relative)).is_file():
            return False
    return True


def _check_params(categories: tuple[str, ...], params: dict[str, Any]) -> None:
    unknown = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
    if unknown or not categories:
        raise ConfigError(f"data.synthetic.categories: unknown or empty {unknown or categories}; "
                          f"choose from {', '.join(SYNTHETIC_CATEGORIES)}")
    for key in ("n_train", "n_test_good", "n_test_defect"):
        if params[key] < 1:
            raise ConfigError(f"data.synthetic.{key} must be >= 1, got {params[key]}")
    if not 32 <= params["size"] <= 2048:
        raise ConfigError(f"data.synthetic.size must be in 32..2048, got {params['size']}")


def _read_marker(marker: Path, params: dict[str, Any]) -> set[str]:
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


def _write_marker(marker: Path, params: dict[str, Any], done: Iterable[str]) -> None:
    content = {"generator": GENERATOR, "version": VERSION, "params": params,
               "categories": sorted(done)}
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def make_synthetic_dataset(root: str | Path,
                           categories: Iterable[str] = SYNTHETIC_CATEGORIES,
                           n_train: int = 30, n_test_good: int = 8, n_test_defect: int = 12,
                           size: int = 128, seed: int = 0,
                           difficulty: Difficulty | None = None) -> Path:
    """Write (or reuse) a synthetic dataset in the MVTec AD layout under `root`; returns root.

    `difficulty` (None: classic) is recorded with the parameters when it is not the classic one.

    Idempotent: `root/synthetic.json` records the parameters and the finished categories; a
    call with the same parameters only writes categories that are missing or incomplete. A root
    made with other parameters, or a non-synthetic folder in the way, is a DataError.
    """
    categories = tuple(categories)
    params = {"n_train": int(n_train), "n_test_good": int(n_test_good),
              "n_test_defect": int(n_test_defect), "size": int(size), "seed": int(seed)}
    _check_params(categories, params)
    difficulty = difficulty or Difficulty()
    params.update(difficulty.params())
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
        _write_category(path, category, params, difficulty)
        done = _read_marker(marker, params) | {category}  # keep what a concurrent run added
        _write_marker(marker, params, done)
    return path
