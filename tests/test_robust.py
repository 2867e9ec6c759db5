"""Poisoned-bank detection on hand-made and synthetic factories: LOO distances, flags, mitigation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from federated.robust import MODES, PoisonReport, detect_poisoned, loo_distances, mitigate
from patchcore.errors import ConfigError

DIM = 16


def mixture(n: int, seed: int) -> torch.Tensor:
    """(n, DIM) draws from one fixed 4-component Gaussian mixture (the 'normal patches')."""
    centres = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1234)) * 3.0  # (4, DIM)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 4, (n,), generator=g)
    return centres[pick] + 0.5 * torch.randn(n, DIM, generator=g)


def honest_factories(count: int, n: int = 300, seed: int = 0) -> dict[int, torch.Tensor]:
    return {k: mixture(n, seed * 100 + k) for k in range(count)}


def test_loo_distances_by_hand() -> None:
    feats = {
        0: torch.tensor([[0.0, 0.0], [10.0, 0.0]]),
        1: torch.tensor([[3.0, 4.0]]),
        2: torch.tensor([[10.0, 1.0], [0.0, -2.0]]),
    }
    d = loo_distances(feats, chunk=1)
    # factory 0: (0,0) -> nearest of {(3,4),(10,1),(0,-2)} is (0,-2): 2; (10,0) -> (10,1): 1
    assert torch.allclose(d[0], torch.tensor([2.0, 1.0]))
    # factory 1: (3,4) -> (0,0): 5 (vs (10,0): sqrt(65), (10,1): sqrt(58), (0,-2): sqrt(45))
    assert torch.allclose(d[1], torch.tensor([5.0]))
    # factory 2: (10,1) -> (10,0): 1; (0,-2) -> (0,0): 2
    assert torch.allclose(d[2], torch.tensor([1.0, 2.0]))
    assert all(v.dtype == torch.float32 for v in d.values())


def test_loo_distances_match_brute_force_cdist() -> None:
    g = torch.Generator().manual_seed(3)
    feats = {k: torch.randn(n, 8, generator=g) + k for k, n in enumerate([37, 5, 64, 1])}
    d = loo_distances(feats, chunk=7)
    for k, x in feats.items():
        others = torch.cat([y for j, y in feats.items() if j != k])
        expect = torch.cdist(x.double(), others.double()).min(dim=1).values
        assert d[k].shape == (len(x),)
        assert torch.allclose(d[k].double(), expect, atol=1e-4)


def test_single_factory_has_no_reference() -> None:
    d = loo_distances({7: torch.zeros(3, 2)})
    assert torch.isinf(d[7]).all()


def test_noise_factory_is_the_only_one_flagged() -> None:
    feats = honest_factories(5)
    norm = float(torch.cat(list(feats.values())).norm(dim=1).mean())
    feats[5] = torch.randn(300, DIM, generator=torch.Generator().manual_seed(9)) * norm / math.sqrt(DIM)
    report, dist = detect_poisoned(feats)
    assert report.flagged == [5]
    assert report.z[5] > report.threshold
    assert "factory-5" in report.reasons[5] and "robust SDs" in report.reasons[5]
    assert set(dist) == set(feats) and all(len(dist[k]) == len(feats[k]) for k in feats)


def test_partial_poisoner_flagged_and_filtered() -> None:
    feats = honest_factories(5)
    good = mixture(210, seed=77)  # (210, DIM) honest-like
    bad = mixture(90, seed=78) + 6.0  # (90, DIM) shifted 'defect' patches
    feats[5] = torch.cat([good, bad])
    report, dist = detect_poisoned(feats)
    assert report.flagged == [5]
    kept, dropped = mitigate(feats, report, dist, "filter")
    rows = kept[5]
    kept_good = sum(bool((good == r).all(dim=1).any()) for r in rows)
    kept_bad = len(rows) - kept_good
    assert kept_good >= 0.8 * len(good)
    assert kept_bad <= 0.2 * len(bad)
    assert dropped[5] == len(feats[5]) - len(rows)
    assert all(dropped[k] == 0 and kept[k] is feats[k] for k in range(5))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_all_honest_nothing_flagged(seed: int) -> None:
    report, _ = detect_poisoned(honest_factories(6, seed=seed))
    assert report.flagged == [] and report.reasons == {}
    assert len(report.z) == 6 and max(report.z.values()) <= report.threshold


def test_fewer_than_min_factories_no_detection() -> None:
    feats = honest_factories(2)
    feats[1] = feats[1] + 50.0  # obviously different, but two factories cannot say which is odd
    report, dist = detect_poisoned(feats)
    assert report.flagged == [] and report.z == {}
    assert "fewer than 3 factories" in report.note
    assert set(report.scores) == {0, 1} and set(dist) == {0, 1}


def test_empty_factory_is_not_scored() -> None:
    feats = honest_factories(4)
    feats[9] = torch.zeros(0, DIM)
    report, dist = detect_poisoned(feats)
    assert 9 not in report.scores and 9 not in report.flagged
    assert "[9]" in report.note and dist[9].shape == (0,)


def _flagged_setup() -> tuple[dict[int, torch.Tensor], PoisonReport, dict[int, torch.Tensor]]:
    feats = honest_factories(4)
    feats[4] = mixture(300, seed=55) + 20.0
    report, dist = detect_poisoned(feats)
    assert report.flagged == [4]
    return feats, report, dist


@pytest.mark.parametrize("mode", ["off", "flag"])
def test_off_and_flag_keep_everything(mode: str) -> None:
    feats, report, dist = _flagged_setup()
    kept, dropped = mitigate(feats, report, dist, mode)
    assert set(kept) == set(feats) and all(kept[k] is feats[k] for k in feats)
    assert dropped == {k: 0 for k in feats}


def test_exclude_drops_flagged_factory() -> None:
    feats, report, dist = _flagged_setup()
    kept, dropped = mitigate(feats, report, dist, "exclude")
    assert set(kept) == {0, 1, 2, 3}
    assert dropped == {0: 0, 1: 0, 2: 0, 3: 0, 4: 300}


def test_unknown_mode_names_the_key() -> None:
    feats, report, dist = _flagged_setup()
    with pytest.raises(ConfigError, match="federation.poison_mode"):
        mitigate(feats, report, dist, "quarantine")
    assert "quarantine" not in MODES


@pytest.mark.parametrize(
    "kwargs", [{"quantile": 0.0}, {"quantile": 1.5}, {"threshold": -1.0}, {"min_factories": 2}, {"mad_floor": -0.1}]
)
def test_bad_parameters_rejected(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        detect_poisoned(honest_factories(3, n=10), **kwargs)


def test_report_is_json_ready() -> None:
    _, report, _ = _flagged_setup()
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["flagged"] == [4] and set(d["z"]) == {"0", "1", "2", "3", "4"}
    assert d["reasons"]["4"].startswith("factory-4: 99th-percentile distance")


def test_filter_cutoff_follows_filter_quantile() -> None:
    feats = honest_factories(5)
    feats[5] = torch.cat([mixture(210, seed=77), mixture(90, seed=78) + 6.0])
    report, dist = detect_poisoned(feats)
    honest_tail = max(float(torch.quantile(dist[k].double(), 0.5)) for k in range(5))
    kept, dropped = mitigate(feats, report, dist, "filter", filter_quantile=0.5)
    assert torch.equal(kept[5], feats[5][dist[5] <= honest_tail])
    assert dropped[5] == int((dist[5] > honest_tail).sum()) > 0
    _, dropped_loose = mitigate(feats, report, dist, "filter", filter_quantile=None)  # detection scores (q=0.99)
    assert dropped_loose[5] < dropped[5]
    with pytest.raises(ConfigError, match="poison_filter_quantile"):
        mitigate(feats, report, dist, "filter", filter_quantile=0.0)
