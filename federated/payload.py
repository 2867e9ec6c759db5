"""What a factory sends to the server, and the checks the server runs before trusting it.

A payload is the factory's local coreset (a few thousand patch vectors, never images) plus the
counts the server needs to weight it. It is Flower-free: `to_parts` gives the arrays and scalars
that the client adapter packs into an `ArrayRecord` and a `ConfigRecord`, and `from_parts`
rebuilds it on the server. `validate` rejects anything that would silently corrupt the global
bank (wrong backbone or dimension, NaN/inf, a newer format) with a one-line reason.

Encodings (`federation.payload_dtype`): float32 (4 bytes a value), float16 (2; distances change
by ~1e-3 relative), int8 (1 byte a value plus one float32 scale per vector: each row is scaled so
its largest absolute value maps to 127, then rounded; the error per value is at most scale/2).
`Payload.decoded()` gives float32 for every encoding. `save_payload`/`load_payload` keep what a
server received as safetensors + JSON, so a federation can be resumed without re-extracting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from federated.config import PAYLOAD_DTYPES
from federated.errors import PayloadError
from patchcore import strict_json
from patchcore.errors import ConfigError
from patchcore.memory_bank import atomic_write_bytes

PAYLOAD_FORMAT_VERSION = 1
DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in PAYLOAD_DTYPES}  # the config's list
CONFIG_KEYS: tuple[str, ...] = ("num_patches", "num_images", "feature_dim", "backbone_id",
                                "factory_id", "format_version")
ARRAY_KEYS: tuple[str, ...] = ("features",)


def raw_feature_bytes(num_patches: int, feature_dim: int) -> int:
    """Bytes the factory's raw fp32 patch features would take: the upload-ratio denominator."""
    return int(num_patches) * int(feature_dim) * 4


@dataclass(eq=False)
class Payload:
    """One factory's contribution: coreset vectors (n, D) and the counts behind them."""

    features: np.ndarray  # (n, D) float16, float32, or int8 (then `scales` holds the row scales)
    num_patches: int  # patches extracted before the local coreset (weights the server's budget)
    num_images: int
    feature_dim: int
    backbone_id: str
    factory_id: int
    format_version: int = PAYLOAD_FORMAT_VERSION
    scales: np.ndarray | None = None  # (n,) float32: int8 rows are features[i] * scales[i]

    @property
    def num_vectors(self) -> int:
        return int(self.features.shape[0])

    @property
    def encoding(self) -> str:
        return str(self.features.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays as sent (features, plus the per-vector scales of int8)."""
        return int(self.features.nbytes) + (int(self.scales.nbytes) if self.scales is not None else 0)

    def with_factory_id(self, factory_id: int) -> "Payload":
        """The same payload under the id this run's server gave its factory (a resumed payload
        was saved under the id of its first run)."""
        return replace(self, factory_id=int(factory_id))

    def decoded(self) -> np.ndarray:
        """(n, D) float32 whatever the encoding."""
        if self.scales is not None:
            with np.errstate(over="ignore"):  # absurd scales decode to inf; validate() says so
                return self.features.astype(np.float32) * self.scales.astype(np.float32)[:, None]
        return self.features.astype(np.float32)

    @property
    def upload_ratio(self) -> float:
        """Sent feature bytes over the raw fp32 features the factory holds."""
        raw = raw_feature_bytes(self.num_patches, self.feature_dim)
        return self.nbytes / raw if raw else float("nan")

    def to_parts(self) -> tuple[dict[str, np.ndarray], dict[str, int | float | str]]:
        """(arrays, config) for the transport: arrays hold the features, config the scalars."""
        arrays = {"features": np.ascontiguousarray(self.features)}
        if self.scales is not None:
            arrays["scales"] = np.ascontiguousarray(self.scales)
        config: dict[str, int | float | str] = {
            "num_patches": int(self.num_patches),
            "num_images": int(self.num_images),
            "feature_dim": int(self.feature_dim),
            "backbone_id": str(self.backbone_id),
            "factory_id": int(self.factory_id),
            "format_version": int(self.format_version),
        }
        return arrays, config

    @classmethod
    def from_parts(cls, arrays: dict[str, np.ndarray],
                   config: dict[str, int | float | str]) -> "Payload":
        """Rebuild a payload; a newer format is reported as such, not as missing keys."""
        version = config.get("format_version")
        if version is not None and _as_int(version, "format_version") != PAYLOAD_FORMAT_VERSION:
            raise PayloadError(f"payload format version {version} is not supported (this "
                               f"server reads version {PAYLOAD_FORMAT_VERSION})")
        missing = [k for k in CONFIG_KEYS if k not in config]
        missing += [k for k in ARRAY_KEYS if k not in arrays]
        if missing:
            raise PayloadError(f"payload is missing key(s): {', '.join(missing)}")
        return cls(
            features=np.asarray(arrays["features"]),
            num_patches=_as_int(config["num_patches"], "num_patches"),
            num_images=_as_int(config["num_images"], "num_images"),
            feature_dim=_as_int(config["feature_dim"], "feature_dim"),
            backbone_id=str(config["backbone_id"]),
            factory_id=_as_int(config["factory_id"], "factory_id"),
            format_version=_as_int(config["format_version"], "format_version"),
            scales=np.asarray(arrays["scales"]) if "scales" in arrays else None,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Payload):
            return NotImplemented
        return (self.to_parts()[1] == other.to_parts()[1]
                and self.features.dtype == other.features.dtype
                and np.array_equal(self.features, other.features,
                                   equal_nan=self.features.dtype.kind == "f")
                and (self.scales is None) == (other.scales is None)
                and (self.scales is None or np.array_equal(self.scales, other.scales)))


def _as_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) \
            or int(value) != value:
        raise PayloadError(f"payload key '{key}' must be an integer, got {value!r}")
    return int(value)


def encode(features: torch.Tensor | np.ndarray, *, num_patches: int, num_images: int,
           backbone_id: str, factory_id: int, dtype: str = "float16") -> Payload:
    """Pack a local coreset (n, D) for sending as float32, float16 or int8 (module docstring)."""
    if dtype not in DTYPES:
        raise ConfigError(f"payload dtype '{dtype}' is unknown; valid: {', '.join(DTYPES)}")
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    values = np.asarray(features, dtype=np.float32)
    if values.ndim != 2:
        raise PayloadError(f"payload features must be 2-D (n, D), got shape {values.shape}")
    scales = None
    if dtype == "int8":
        values, scales = quantize_int8(values)
    array = np.ascontiguousarray(values, dtype=DTYPES[dtype])  # (n, D)
    return Payload(array, num_patches=int(num_patches), num_images=int(num_images),
                   feature_dim=int(array.shape[1]), backbone_id=str(backbone_id),
                   factory_id=int(factory_id), scales=scales)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float32 -> (int8 codes (n, D), float32 scales (n,)); a zero row gets scale 1."""
    peak = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)  # (n,)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def validate(payload: Payload, *, expected_dim: int, expected_backbone: str,
             max_vectors: int | None = None, max_bytes: int | None = None) -> None:
    """Raise PayloadError with a one-line reason if the server must not use `payload`.

    Cheap structural checks come first; the scan for NaN/inf comes last.
    """
    who = f"payload from factory-{payload.factory_id}"
    if payload.format_version != PAYLOAD_FORMAT_VERSION:
        raise PayloadError(f"{who}: format version {payload.format_version} is not supported "
                           f"(expected {PAYLOAD_FORMAT_VERSION})")
    features = payload.features
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        shape = getattr(features, "shape", type(features).__name__)
        raise PayloadError(f"{who}: features must be a 2-D array (n, D), got {shape}")
    if features.dtype not in DTYPES.values():
        raise PayloadError(f"{who}: features dtype {features.dtype} is not one of "
                           f"{', '.join(DTYPES)}")
    n, dim = features.shape
    _validate_scales(payload, who)
    if n == 0:
        raise PayloadError(f"{who}: features are empty (0 vectors)")
    if dim != payload.feature_dim:
        raise PayloadError(f"{who}: features have dimension {dim} but feature_dim says "
                           f"{payload.feature_dim}")
    if dim != expected_dim:
        raise PayloadError(f"{who}: feature dimension {dim} does not match the expected "
                           f"{expected_dim}")
    if payload.backbone_id != expected_backbone:
        raise PayloadError(f"{who}: backbone '{payload.backbone_id}' does not match the "
                           f"expected '{expected_backbone}'")
    _validate_sizes(payload, who, max_vectors, max_bytes)
    values = payload.decoded() if payload.scales is not None else features
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).any(axis=1).sum())
        raise PayloadError(f"{who}: features contain non-finite values (NaN/inf) in {bad} of "
                           f"{n} vectors")


def _validate_scales(payload: Payload, who: str) -> None:
    """int8 needs one finite, positive float scale per vector; float encodings need none."""
    scales, n = payload.scales, payload.features.shape[0]
    if payload.features.dtype != np.int8:
        if scales is not None:
            raise PayloadError(f"{who}: scales were sent with {payload.features.dtype} features "
                               f"(only int8 payloads carry scales)")
        return
    if not isinstance(scales, np.ndarray) or scales.shape != (n,) \
            or scales.dtype not in (np.float16, np.float32):
        shape = getattr(scales, "shape", None)
        raise PayloadError(f"{who}: int8 features need float32 scales of shape ({n},), got "
                           f"{shape if scales is not None else 'none'}")
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise PayloadError(f"{who}: int8 scales must be finite and > 0")


def _validate_sizes(payload: Payload, who: str, max_vectors: int | None,
                    max_bytes: int | None) -> None:
    n = payload.num_vectors
    if payload.num_patches < 0 or payload.num_images < 0:
        raise PayloadError(f"{who}: num_patches and num_images must be >= 0, got "
                           f"{payload.num_patches}, {payload.num_images}")
    if n > payload.num_patches:
        raise PayloadError(f"{who}: {n} vectors sent but only {payload.num_patches} patches "
                           f"extracted (a coreset cannot exceed its source)")
    if max_vectors is not None and n > max_vectors:
        raise PayloadError(f"{who}: {n} vectors exceed the limit of {max_vectors}")
    if max_bytes is not None and payload.nbytes > max_bytes:
        raise PayloadError(f"{who}: {payload.nbytes} feature bytes exceed the limit of "
                           f"{max_bytes}")


def payload_fingerprint(settings: Any) -> str:
    """A short hash of the settings a payload depends on (model, data, federation, privacy):
    a saved payload is reused only by a run whose fingerprint matches."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_payload(payload: Payload, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """`path`.safetensors (features [+ scales]) and `path`.json (the scalars + `extra`), each
    written to a temporary file and renamed, so an interrupted save leaves the old pair."""
    tensor_path, meta_path = Path(f"{path}.safetensors"), Path(f"{path}.json")
    arrays, scalars = payload.to_parts()
    tmp = tensor_path.with_name(f".{tensor_path.name}.tmp")
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(tmp))
    tmp.replace(tensor_path)
    atomic_write_bytes(meta_path, strict_json.dumps({**scalars, **(extra or {})}).encode())  # NaN/inf -> null
    return tensor_path


def load_payload(path: str | Path) -> tuple[Payload, dict[str, Any]]:
    """(payload, the JSON sidecar) from `save_payload`'s pair; PayloadError naming the file."""
    tensor_path, meta_path = Path(f"{path}.safetensors"), Path(f"{path}.json")
    try:
        arrays = load_file(str(tensor_path))
        meta = json.loads(meta_path.read_text())
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"cannot read saved payload {tensor_path}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(meta, dict):
        raise PayloadError(f"saved payload {meta_path} is not a JSON object")
    return Payload.from_parts(arrays, {k: meta[k] for k in CONFIG_KEYS if k in meta}), meta
