"""The federation's message protocol, free of Flower: record names, typed requests and replies.

Both Flower apps (clients/app.py, server/app.py) and the in-process transport (federated/rounds.py)
speak this protocol, so a simulated, an in-process and a deployed federation exchange exactly the
same records. A message is a `Records` value: {record name: {key: value}}, where the record's
kind (arrays, config scalars, metrics) is fixed by its name in `RECORD_KINDS`; the Flower
adapters turn each kind into an ArrayRecord, ConfigRecord or MetricRecord and back.

Three exchanges, one per round:
- identify (Flower's "query"): the server asks nothing; a site answers `SiteInfo` (its factory
  name, categories and image counts). No image is read, no backbone loaded.
- train: the server sends `TrainRequest` (the integer id it assigned to that factory, used for
  payload provenance and noise seeds); the site answers `TrainReply` (local coresets as payloads).
- evaluate: `EvaluateRequest` carries the global banks of the site's categories; the site answers
  `EvaluateReply` with numbers only.
Int8 payloads carry their per-vector scales as a second array "<category>#scales".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from federated.errors import PayloadError
from federated.payload import Payload

IDENTIFY, TRAIN, EVALUATE = "query", "train", "evaluate"  # Flower's MessageType values
PHASES = {IDENTIFY: "identify", TRAIN: "train", EVALUATE: "evaluate"}

SITE, ASSIGNMENT, PAYLOAD = "site", "assignment", "payload"
FEATURES, BANKS = "features", "banks"
METRICS, TIMINGS, RELEASE = "metrics", "timings", "release"
CALIBRATION = "calibration"  # {category: (n,) image scores of a site's held-out normal images}
RECORD_KINDS = {SITE: "config", ASSIGNMENT: "config", PAYLOAD: "config",
                FEATURES: "arrays", BANKS: "arrays", CALIBRATION: "arrays",
                METRICS: "metrics", TIMINGS: "metrics", RELEASE: "metrics"}
SCALES_SUFFIX = "#scales"

Records = dict[str, dict[str, Any]]  # {record name: {key: array | scalar | list of scalars}}

_NATURAL = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders "factory-2" before "factory-10" (ids follow this order)."""
    return tuple(int(p) if p.isdigit() else p for p in _NATURAL.split(name))


@dataclass(frozen=True)
class Failure:
    """A node that answered with an error (a crash, or Flower's word that the node is gone)."""

    reason: str


@dataclass
class SiteInfo:
    """What a site announces in the identify round: who it is and how much data it holds."""

    factory: str
    counts: dict[str, dict[str, int]]  # {category: {"train": n, "test": n, "validation": n}}

    @property
    def categories(self) -> list[str]:
        return sorted(self.counts)

    def to_records(self) -> Records:
        site: dict[str, Any] = {"factory": self.factory, "categories": self.categories}
        for category, counts in self.counts.items():
            site.update({f"{split}.{category}": int(n) for split, n in counts.items()})
        return {SITE: site}

    @classmethod
    def from_records(cls, records: Records) -> "SiteInfo":
        site = records[SITE]
        counts: dict[str, dict[str, int]] = {str(c): {} for c in site.get("categories", [])}
        for key, value in site.items():
            split, dot, category = key.partition(".")
            if dot and category in counts:
                counts[category][split] = int(value)
        return cls(factory=str(site["factory"]), counts=counts)


def _assignment(factory: str, factory_id: int) -> dict[str, Any]:
    """The ASSIGNMENT record of a request: which factory it is for, and the id the server gave it."""
    return {"factory": factory, "factory-id": int(factory_id)}


def _assigned(records: Records) -> tuple[str, int]:
    a = records[ASSIGNMENT]
    return str(a["factory"]), int(a["factory-id"])


@dataclass
class TrainRequest:
    factory: str
    factory_id: int

    def to_records(self) -> Records:
        return {ASSIGNMENT: _assignment(self.factory, self.factory_id)}

    @classmethod
    def from_records(cls, records: Records) -> "TrainRequest":
        return cls(*_assigned(records))


def pack_payloads(payloads: Mapping[str, Payload]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{category: payload} -> (arrays by category, scalars keyed "<category>.<field>")."""
    arrays, scalars = {}, {}
    for category, payload in payloads.items():
        parts, fields = payload.to_parts()
        arrays[category] = parts["features"]  # (n, D) float32/float16/int8
        if "scales" in parts:
            arrays[category + SCALES_SUFFIX] = parts["scales"]  # (n,) float32
        scalars.update({f"{category}.{k}": v for k, v in fields.items()})
    return arrays, scalars


def unpack_payloads(arrays: Mapping[str, np.ndarray],
                    scalars: Mapping[str, Any]) -> tuple[dict[str, Payload], dict[str, str]]:
    """Inverse of `pack_payloads`: ({category: payload}, {category: why it is unreadable})."""
    fields: dict[str, dict[str, Any]] = {c: {} for c in arrays if not c.endswith(SCALES_SUFFIX)}
    for key, value in scalars.items():
        category, _, name = key.rpartition(".")  # field names hold no dot; categories may
        fields.setdefault(category, {})[name] = value
    payloads, problems = {}, {}
    for category, config in fields.items():
        try:
            parts = {"features": np.asarray(arrays[category])} if category in arrays else {}
            if category + SCALES_SUFFIX in arrays:
                parts["scales"] = np.asarray(arrays[category + SCALES_SUFFIX])
            payloads[category] = Payload.from_parts(parts, config)
        except (PayloadError, TypeError, ValueError) as exc:
            problems[category] = str(exc)
    return payloads, problems


@dataclass
class TrainReply:
    """A site's local coresets. `problems` is filled on the receiving side: categories whose
    payload could not be read back (kept apart, so one bad category does not void the others)."""

    factory: str
    factory_id: int
    payloads: dict[str, Payload]
    train_images: int
    timings: dict[str, float] = field(default_factory=dict)
    release: dict[str, float] = field(default_factory=dict)  # privacy bookkeeping per category
    problems: dict[str, str] = field(default_factory=dict)
    device: str = ""  # where the site computed (e.g. "cuda:0", "cpu"); "" from older sites

    @property
    def empty(self) -> bool:
        return not self.payloads and not self.problems

    def to_records(self) -> Records:
        arrays, scalars = pack_payloads(self.payloads)
        site = {"factory": self.factory, "factory-id": int(self.factory_id),
                "categories": sorted(self.payloads), "train-images": int(self.train_images),
                "status": "ok" if self.payloads else "empty"}
        if self.device:
            site["device"] = self.device
        return {FEATURES: arrays, PAYLOAD: scalars, SITE: site,
                TIMINGS: {k: float(v) for k, v in self.timings.items()},
                RELEASE: {k: float(v) for k, v in self.release.items()}}

    @classmethod
    def from_records(cls, records: Records) -> "TrainReply":
        site = records[SITE]
        payloads, problems = unpack_payloads(records.get(FEATURES, {}), records.get(PAYLOAD, {}))
        return cls(factory=str(site["factory"]), factory_id=int(site["factory-id"]),
                   payloads=payloads, train_images=int(site.get("train-images", 0)),
                   timings={k: float(v) for k, v in records.get(TIMINGS, {}).items()},
                   release={k: float(v) for k, v in records.get(RELEASE, {}).items()},
                   problems=problems, device=str(site.get("device", "")))


@dataclass
class EvaluateRequest:
    factory: str
    factory_id: int
    banks: dict[str, np.ndarray]  # {category: (M, D) float32}

    def to_records(self) -> Records:
        return {BANKS: {c: np.ascontiguousarray(b, dtype=np.float32) for c, b in self.banks.items()},
                ASSIGNMENT: _assignment(self.factory, self.factory_id)}

    @classmethod
    def from_records(cls, records: Records) -> "EvaluateRequest":
        return cls(*_assigned(records), banks={c: np.asarray(b) for c, b in records[BANKS].items()})


@dataclass
class EvaluateReply:
    factory: str
    metrics: dict[str, dict[str, float]]  # {category: {metric: value}}
    timings: dict[str, float] = field(default_factory=dict)
    # {category: image scores of the site's held-out normals under the global bank}: numbers
    # only, from which the server calibrates the global bank's threshold
    calibration: dict[str, np.ndarray] = field(default_factory=dict)

    def to_records(self) -> Records:
        flat = {f"{c}.{k}": float(v) for c, m in self.metrics.items() for k, v in m.items()}
        out = {METRICS: flat, SITE: {"factory": self.factory},
               TIMINGS: {k: float(v) for k, v in self.timings.items()}}
        if self.calibration:
            out[CALIBRATION] = {c: np.asarray(v, dtype=np.float64) for c, v in self.calibration.items()}
        return out

    @classmethod
    def from_records(cls, records: Records) -> "EvaluateReply":
        per_category: dict[str, dict[str, float]] = {}
        for key, value in records[METRICS].items():
            category, _, metric = key.rpartition(".")
            per_category.setdefault(category, {})[metric] = float(value)
        return cls(factory=str(records[SITE]["factory"]), metrics=per_category,
                   timings={k: float(v) for k, v in records.get(TIMINGS, {}).items()},
                   calibration={c: np.asarray(v, dtype=np.float64).ravel()
                                for c, v in records.get(CALIBRATION, {}).items()})


def to_flower(records: Records):  # -> flwr.app.RecordDict
    """Records as Flower's RecordDict (arrays -> ArrayRecord, config -> ConfigRecord, metrics ->
    MetricRecord). Flower is imported here only, so this module loads without it."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    out = {}
    for name, values in records.items():
        kind = RECORD_KINDS[name]
        if kind == "arrays":
            out[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})
        elif kind == "metrics":
            out[name] = MetricRecord({k: float(v) for k, v in values.items()})
        else:
            out[name] = ConfigRecord(dict(values))
    return RecordDict(out)


def from_flower(content: Any) -> Records:
    """Inverse of `to_flower`: plain dicts with numpy arrays."""
    out: Records = {}
    for name, record in content.items():
        if RECORD_KINDS.get(name) == "arrays":
            out[name] = {k: a.numpy() for k, a in record.items()}
        else:
            out[name] = dict(record.items())
    return out
