"""Accept/reject threshold calibration on validation image scores.

A deployed inspection station needs one number: an image is rejected when its anomaly score is
strictly above the threshold. The threshold is chosen on validation scores either to maximise
F1 (needs anomalous examples) or as a quantile of the normal scores (a target false-alarm rate
when no defects are at hand), and it travels with the memory bank as a plain dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from patchcore.config import THRESHOLD_METHODS as METHODS  # the config's list
from patchcore.errors import ConfigError, DataError
from patchcore.metrics import f1_max, to_numpy


@dataclass(frozen=True)
class Threshold:
    """A calibrated decision rule: reject when score > value, else accept."""

    value: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def decide(self, score: float) -> str:
        """'reject' when the score is strictly above the threshold, else 'accept' (the words
        `fedpatch predict`, the inspection API and the dashboard use)."""
        return "reject" if float(score) > self.value else "accept"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in a memory bank's metadata."""
        return {"value": float(self.value), "method": self.method, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Threshold:
        """Inverse of `to_dict`; ConfigError names what is missing or malformed."""
        if not isinstance(data, Mapping) or "value" not in data or "method" not in data:
            raise ConfigError(f"a threshold record needs 'value' and 'method', got {data!r}")
        value = data["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ConfigError(f"threshold value must be a finite number, got {value!r}")
        if data["method"] not in METHODS:
            raise ConfigError(f"threshold method must be one of {', '.join(METHODS)}, "
                              f"got {data['method']!r}")
        details = data.get("details", {})
        if not isinstance(details, Mapping):
            raise ConfigError(f"threshold details must be a mapping, got {details!r}")
        return cls(float(value), str(data["method"]), dict(details))


def _scores(scores: Any, what: str) -> np.ndarray:
    """(N,) finite float64 scores, or DataError naming which set is bad."""
    scores = to_numpy(scores).astype(np.float64).ravel()
    if not np.isfinite(scores).all():
        raise DataError(f"{what} scores contain NaN or infinity: check the model's output")
    return scores


def calibrate_threshold(normal_scores: Any, anomalous_scores: Any = None, method: str = "f1",
                        quantile: float = 0.99) -> Threshold:
    """Threshold from validation image scores.

    method "f1": the F1-max cut over normal (label 0) and anomalous (label 1) scores, placed
    midway between the two scores it separates; needs anomalous scores.
    method "quantile": the `quantile` of the normal scores (linear interpolation), so about
    1 - quantile of normal images are rejected; anomalous scores, if given, are not used.
    """
    if method not in METHODS:
        raise ConfigError(f"threshold method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile < 1.0:
        raise ConfigError(f"threshold quantile must be in (0, 1), got {quantile!r}")
    normal = _scores(normal_scores, "normal")
    if normal.size == 0:
        raise DataError("no normal validation scores to calibrate a threshold on")
    if method == "quantile":
        value = float(np.quantile(normal, quantile))
        return Threshold(value, method, {"quantile": float(quantile), "num_normal": int(normal.size)})
    anomalous = _scores([] if anomalous_scores is None else anomalous_scores, "anomalous")
    if anomalous.size == 0:
        raise DataError("threshold method 'f1' needs anomalous validation scores; "
                        "give some or use method 'quantile'")
    labels = np.concatenate([np.zeros(normal.size, np.int64), np.ones(anomalous.size, np.int64)])
    f1, value = f1_max(labels, np.concatenate([normal, anomalous]))
    return Threshold(value, method, {"f1": f1, "num_normal": int(normal.size),
                                     "num_anomalous": int(anomalous.size)})
