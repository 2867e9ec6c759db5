"""Accept/reject threshold calibration: hand cases, the strict reject-above rule, errors, round trip."""

import json

import numpy as np
import pytest
import torch

from patchcore.errors import ConfigError, DataError
from patchcore.threshold import Threshold, calibrate_threshold


def test_quantile_threshold_and_strict_decision():
    normal = np.arange(100, dtype=float)
    t = calibrate_threshold(normal, method="quantile", quantile=0.99)
    assert t.value == pytest.approx(98.01)  # linear interpolation between 98 and 99
    assert t.method == "quantile" and t.details == {"quantile": 0.99, "num_normal": 100}
    assert t.decide(98.5) == "reject"
    assert t.decide(t.value) == "accept"  # equal is not above
    # anomalous scores are ignored by the quantile method
    assert calibrate_threshold(normal, [1e6], method="quantile", quantile=0.99).value == t.value


def test_f1_threshold_hand_case():
    # best cut flags 0.35 and above (F1 0.8); the threshold sits midway to 0.1
    t = calibrate_threshold([0.1, 0.4], [0.35, 0.8], method="f1")
    assert t.value == pytest.approx(0.225)
    assert t.details == {"f1": pytest.approx(0.8), "num_normal": 2, "num_anomalous": 2}
    assert [t.decide(s) for s in (0.1, 0.35, 0.4, 0.8)] == ["accept", "reject", "reject", "reject"]


def test_f1_threshold_separates_separable_scores_and_accepts_tensors():
    t = calibrate_threshold(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.6]))
    assert t.value == pytest.approx(0.35) and t.details["f1"] == 1.0


def test_f1_threshold_when_every_image_must_fail():
    # a normal score above every anomalous one: the best cut flags everything
    t = calibrate_threshold([0.9], [0.1, 0.2, 0.3])
    assert [t.decide(s) for s in (0.1, 0.2, 0.3)] == ["reject"] * 3
    assert t.details["f1"] == pytest.approx(6 / 7)


def test_calibration_errors_are_actionable():
    with pytest.raises(DataError, match="needs anomalous.*quantile"):
        calibrate_threshold([0.1, 0.2], None, method="f1")
    with pytest.raises(DataError, match="needs anomalous"):
        calibrate_threshold([0.1, 0.2], [], method="f1")
    with pytest.raises(DataError, match="no normal"):
        calibrate_threshold([], [0.5], method="f1")
    with pytest.raises(DataError, match="NaN"):
        calibrate_threshold([0.1, float("nan")], method="quantile")
    with pytest.raises(ConfigError, match="method"):
        calibrate_threshold([0.1], [0.5], method="youden")
    for q in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match=r"quantile must be in \(0, 1\)"):
            calibrate_threshold([0.1, 0.2], method="quantile", quantile=q)


def test_round_trip_through_json_and_bad_records():
    t = calibrate_threshold([0.1, 0.4], [0.35, 0.8])
    back = Threshold.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    with pytest.raises(ConfigError, match="'value' and 'method'"):
        Threshold.from_dict({"method": "f1"})
    with pytest.raises(ConfigError, match="finite number"):
        Threshold.from_dict({"value": "high", "method": "f1"})
    with pytest.raises(ConfigError, match="method must be one of"):
        Threshold.from_dict({"value": 0.3, "method": "manual"})
