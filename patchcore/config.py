"""Typed configuration: YAML -> frozen dataclasses, strictly.

Every section is a dataclass; `build(cls, mapping)` walks its fields, so an unknown key, a wrong
type or an out-of-range value fails with one line naming the dotted key (e.g.
`model.coreset.ratio`). Defaults are the paper's and the official implementation's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from patchcore.errors import ConfigError

T = TypeVar("T")
DATA_FORMATS = ("synthetic", "mvtec", "mvtec3d", "autovi")
LAYER_WEIGHTINGS = ("auto", "paper", "concat", "balanced")
# The names of patchcore/backbones.py's REGISTRY (a test keeps them equal), checked here without
# importing torch: the CLI validates a config before any heavy library loads.
BACKBONES = ("wide_resnet50_2", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "wide_resnet50_2"
    layers: tuple[str, ...] = ("layer2", "layer3")
    weights: str = "imagenet"  # "imagenet" | "none" | path to a state-dict file


@dataclass(frozen=True)
class CoresetConfig:
    ratio: float = 0.1
    method: str = "approximate"  # "approximate" | "exact"
    projection_dim: int | None = 128
    num_starts: int = 10
    # float32: exact arithmetic, the reference picks. bfloat16: the projected matrix stored in
    # bf16 (half the memory traffic per step), fp32 norms and minima; see patchcore/coreset.py.
    precision: str = "float32"
    # auto: skip, by a principal-subspace lower bound, the points a new centre cannot improve (CPU,
    # float32; same picks as the plain loop); on | off. See patchcore/coreset.py.
    pruning: str = "auto"


@dataclass(frozen=True)
class IvfPqConfig:
    """FAISS IVF-PQ index (model.nn_backend: faiss_ivfpq): approximate, compressed NN search."""

    nlist: int = 64  # inverted lists (k-means cells) trained on the bank
    m: int = 64  # PQ sub-quantizers; must divide the feature dimension
    nbits: int = 8  # bits per sub-quantizer code
    nprobe: int = 8  # lists visited per query
    refine: int = 0  # > 0: re-rank k×refine candidates by exact distance (keeps the full bank)


@dataclass(frozen=True)
class TransformConfig:
    """Maps applied to every patch embedding (patchcore/transform.py); off by default."""

    projection_dim: int | None = None  # shared Gaussian random projection to this many dims
    projection_seed: int = 0
    clip_norm: float | None = None  # per-vector L2 clipping (differential privacy needs it)


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    patch_size: int = 3
    pretrain_embed_dim: int = 1024
    target_embed_dim: int = 1024
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    num_neighbours: int = 1
    # The official code scores with faiss IndexFlatL2, i.e. squared L2; the paper writes L2.
    # Image AUROC is identical either way; pixel maps differ slightly after smoothing.
    score_distance: str = "squared_l2"  # "squared_l2" | "l2"
    smoothing_sigma: float = 4.0
    # How the layers' patch features become one embedding (patchcore/features.py):
    # "paper" (per-layer adaptive pooling to pretrain_embed_dim, then to target_embed_dim),
    # "concat" (3x3-averaged raw channels concatenated, as anomalib), "balanced" (the same with
    # each layer scaled by 1/sqrt(its channels)), "auto" (the backbone's measured default).
    layer_weighting: str = "auto"
    nn_backend: str = "torch"  # "torch" | "faiss" | "faiss_ivfpq"
    # torch backend, 1-NN: "bfloat16" = bf16 products + exact float32 re-ranking of every row the
    # products' error bound cannot exclude (the exact nearest neighbour, certified; ~2x faster
    # here); "float32" = float32 products; "auto" = bfloat16 where the hardware has fast bf16.
    nn_precision: str = "auto"
    ivfpq: IvfPqConfig = field(default_factory=IvfPqConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    # Backbone forward under autocast: bfloat16 on CPU, float16 on CUDA (float32: exact, default).
    precision: str = "float32"  # "float32" | "bfloat16" | "float16"


@dataclass(frozen=True)
class SyntheticConfig:
    categories: tuple[str, ...] = ("stripes", "disc")
    size: int = 128
    n_train: int = 30
    n_test_good: int = 8
    n_test_defect: int = 12
    # Difficulty (patchcore/data/synthetic.py; checked there): the defaults are the classic rendering.
    defect_contrast: float = 1.0  # share of the classic defect's colour change, (0, 1]
    defect_size: float = 1.0  # defect lengths and radii scale, [0.3, 1.5]
    texture_variation: float = 0.0  # material lots, shape spread, rare normal features, [0, 1]
    lighting_variation: float = 0.0  # per-image lamp gain, colour, gradient, vignette, [0, 1]


@dataclass(frozen=True)
class DataConfig:
    format: str = "mvtec"  # synthetic | mvtec | mvtec3d | autovi
    root: str = ""  # "${FEDPATCH_DATA_ROOT}" style variables are expanded
    categories: tuple[str, ...] = ()  # empty: every category under root
    resize: int | tuple[int, int] = 256
    crop: int | tuple[int, int] | None = 224
    require_masks: bool = True
    # Metrics on maps mapped back to each image's original size (AutoVI's evaluation requires it;
    # AutoVI also gets AUC-sPRO@0.05 from defects_config.json). False: at the crop, as PatchCore.
    evaluate_at_original: bool = False
    batch_size: int = 8
    num_workers: int = 0
    # Per-factory on-disk cache of patch embeddings (patchcore/cache.py); "" = off.
    cache_dir: str = ""
    # Size cap of that cache in GB (oldest-used entries evicted past it); 0 = no cap.
    cache_max_gb: float = 20.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ThresholdConfig:
    method: str = "quantile"  # "quantile" (normal validation scores) | "f1" (needs anomalous ones too)
    quantile: float = 0.99
    # Without a validation split, this seeded share of the training normals is held out of the
    # bank to calibrate the threshold (0 = off: such a bank stays uncalibrated).
    holdout: float = 0.1


@dataclass(frozen=True)
class Config:
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    output_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)

    def validate(self) -> None:
        """Range checks that a type system cannot express."""
        checks = [
            (0.0 < self.model.coreset.ratio <= 1.0, "model.coreset.ratio", "must be in (0, 1]"),
            (self.model.coreset.method in ("approximate", "exact"), "model.coreset.method", "must be approximate or exact"),
            (self.model.score_distance in ("squared_l2", "l2"), "model.score_distance", "must be squared_l2 or l2"),
            (self.model.coreset.precision in ("float32", "bfloat16"), "model.coreset.precision", "must be float32 or bfloat16"),
            (self.model.coreset.pruning in ("auto", "on", "off"), "model.coreset.pruning", "must be auto, on or off"),
            (self.model.nn_backend in ("torch", "faiss", "faiss_ivfpq"), "model.nn_backend", "must be torch, faiss or faiss_ivfpq"),
            (self.model.nn_precision in ("auto", "float32", "bfloat16"), "model.nn_precision", "must be auto, float32 or bfloat16"),
            (min(self.model.ivfpq.nlist, self.model.ivfpq.m, self.model.ivfpq.nprobe) >= 1
             and 1 <= self.model.ivfpq.nbits <= 16 and self.model.ivfpq.refine >= 0,
             "model.ivfpq", "needs nlist, m, nprobe >= 1, nbits in [1, 16], refine >= 0"),
            (self.model.precision in ("float32", "bfloat16", "float16"), "model.precision", "must be float32, bfloat16 or float16"),
            (self.model.patch_size >= 1 and self.model.patch_size % 2 == 1, "model.patch_size", "must be odd and >= 1"),
            (self.model.num_neighbours >= 1, "model.num_neighbours", "must be >= 1"),
            (self.model.smoothing_sigma >= 0, "model.smoothing_sigma", "must be >= 0"),
            # its upper bound (the embedding size) is checked by FeatureTransform, which knows it
            (self.model.transform.projection_dim is None or 1 <= self.model.transform.projection_dim,
             "model.transform.projection_dim", "must be >= 1"),
            (self.model.transform.clip_norm is None or self.model.transform.clip_norm > 0, "model.transform.clip_norm", "must be > 0"),
            (self.data.format in DATA_FORMATS, "data.format", f"must be one of {', '.join(DATA_FORMATS)}"),
            (self.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
            (self.threshold.method in ("f1", "quantile"), "threshold.method", "must be f1 or quantile"),
            (0.0 < self.threshold.quantile < 1.0, "threshold.quantile", "must be in (0, 1)"),
            (0.0 <= self.threshold.holdout < 1.0, "threshold.holdout", "must be in [0, 1)"),
            (self.model.layer_weighting in LAYER_WEIGHTINGS, "model.layer_weighting",
             f"must be one of {', '.join(LAYER_WEIGHTINGS)}"),
            (self.data.cache_max_gb >= 0, "data.cache_max_gb", "must be >= 0"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key} {message}")
        if self.model.backbone.name not in BACKBONES:  # unknown names fail here, before any work
            raise ConfigError(f"unknown backbone {self.model.backbone.name!r} (model.backbone.name); "
                              f"choose one of {', '.join(BACKBONES)}")
        # An empty data.root is an error where images are read (patchcore.data.sources.data_root),
        # not here: a deployed federation's server reads none, each site names its own folder.


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def build(cls: type[T], mapping: Any, prefix: str = "") -> T:
    """Strictly build dataclass `cls` from a mapping: unknown keys are errors."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in mapping:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in mapping.items()}
    return cls(**values)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(text: str) -> str:
    """Expand ${VAR}; an unset variable is an error naming it."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"environment variable {name} (used in the config) is not set")
        return os.environ[name]

    return _VAR.sub(sub, text)


def load_config(path: str | Path, cls: type[T] = Config, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file into `cls`, apply dotted-key overrides (e.g. {"data.root": ...}), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    config = build(cls, raw)
    if getattr(config, "data", None) is not None and config.data.root:
        data = dataclasses.replace(config.data, root=expand_vars(config.data.root))
        config = dataclasses.replace(config, data=data)
    config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
