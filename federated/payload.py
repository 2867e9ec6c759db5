"""What a factory sends to the server, and the checks the server runs before trusting it.

A payload is the factory's local coreset (a few thousand patch vectors, never images) plus the
counts the server needs to weight it. It is Flower-free: `to_parts` gives the arrays and scalars
that the client adapter packs into an `ArrayRecord` and a `ConfigRecord`, and `from_parts`
rebuilds it on the server. `validate` rejects anything that would silently corrupt the global
bank (wrong backbone or dimension, NaN/inf, a newer format) with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from federated.errors import PayloadError
from patchcore.errors import ConfigError

PAYLOAD_FORMAT_VERSION = 1
DTYPES: dict[str, np.dtype] = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
CONFIG_KEYS: tuple[str, ...] = ("num_patches", "num_images", "feature_dim", "backbone_id",
                                "factory_id", "format_version")
ARRAY_KEYS: tuple[str, ...] = ("features",)


def raw_feature_bytes(num_patches: int, feature_dim: int) -> int:
    """Bytes the factory's raw fp32 patch features would take: the upload-ratio denominator."""
    return int(num_patches) * int(feature_dim) * 4


@dataclass(eq=False)
class Payload:
    """One factory's contribution: coreset vectors (n, D) and the counts behind them."""

    features: np.ndarray  # (n, D) float16 or float32
    num_patches: int  # patches extracted before the local coreset (weights the server's budget)
    num_images: int
    feature_dim: int
    backbone_id: str
    factory_id: int
    format_version: int = PAYLOAD_FORMAT_VERSION

    @property
    def num_vectors(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the feature array as sent."""
        return int(self.features.nbytes)

    @property
    def upload_ratio(self) -> float:
        """Sent feature bytes over the raw fp32 features the factory holds."""
        raw = raw_feature_bytes(self.num_patches, self.feature_dim)
        return self.nbytes / raw if raw else float("nan")

    def to_parts(self) -> tuple[dict[str, np.ndarray], dict[str, int | float | str]]:
        """(arrays, config) for the transport: arrays hold the features, config the scalars."""
        arrays = {"features": np.ascontiguousarray(self.features)}
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
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Payload):
            return NotImplemented
        return (self.to_parts()[1] == other.to_parts()[1]
                and self.features.dtype == other.features.dtype
                and np.array_equal(self.features, other.features, equal_nan=True))


def _as_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) \
            or int(value) != value:
        raise PayloadError(f"payload key '{key}' must be an integer, got {value!r}")
    return int(value)


def encode(features: torch.Tensor | np.ndarray, *, num_patches: int, num_images: int,
           backbone_id: str, factory_id: int, dtype: str = "float16") -> Payload:
    """Pack a local coreset (n, D) for sending; fp16 halves the upload at no measurable cost
    to nearest-neighbour distances."""
    if dtype not in DTYPES:
        raise ConfigError(f"payload dtype '{dtype}' is unknown; valid: {', '.join(DTYPES)}")
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(np.asarray(features), dtype=DTYPES[dtype])  # (n, D)
    if array.ndim != 2:
        raise PayloadError(f"payload features must be 2-D (n, D), got shape {array.shape}")
    return Payload(array, num_patches=int(num_patches), num_images=int(num_images),
                   feature_dim=int(array.shape[1]), backbone_id=str(backbone_id),
                   factory_id=int(factory_id))


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
        raise PayloadError(f"{who}: features dtype {features.dtype} is not float16 or float32")
    n, dim = features.shape
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
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise PayloadError(f"{who}: features contain non-finite values (NaN/inf) in {bad} of "
                           f"{n} vectors")


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
