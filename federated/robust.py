"""Poisoned-bank detection across factories: leave-one-out distances, robust z-scores, mitigation.

The threat: a hostile (or broken) factory sends a local coreset that is not made of normal
patches: features of DEFECTIVE parts (so that a defect class later scores as normal, because its
patches find a close neighbour in the global bank), or random noise. Such vectors are far from
everything the other factories saw.

The statistic. For every vector of factory k we take its L2 distance to the nearest vector among
ALL OTHER factories' vectors (leave-one-out, LOO), and summarise factory k by a high quantile
s_k of those distances (default the 99th percentile).

- Why leave-one-out: a factory's own vectors are always close to each other (they are a coreset
  of one image set), so a poisoner would hide behind itself; removing the factory's own vectors
  asks the only question that matters: "did anybody else see patches like these?".
- Why a high quantile rather than the mean or the median: a poisoner rarely sends only poison.
  Defect patches of real images are a minority (the background of a defective tire is still a
  tire), so the median LOO distance of a defect-image factory barely moves while its tail does.
- Why robust: s is compared across factories with the median and the MAD (scaled by 1.4826 to be
  a standard deviation under a normal law), z_k = (s_k - median(s)) / (1.4826 MAD(s)); one
  poisoner cannot drag the median or the MAD, where it would inflate a mean and a standard
  deviation and hide itself. The MAD is floored (by default at 5% of the median) because honest
  IID factories can be nearly identical, and a MAD near 0 would turn harmless jitter into huge z.
  The test is one-sided (z_k > threshold): a factory closer to the others than usual is not a
  threat to the bank.

Defaults (quantile 0.99, threshold 3.5, MAD floor 2% of the median) come from MVTec AD `tire`,
EfficientNet-Lite0, 4 honest factories of 42 train images + a 5th, 10% local coresets (~3.3k
vectors each), 5 random splits. Honest factories' s_k lie within ~5% of the median at q=0.99
(~3% at q=0.9). A factory of 40 defect images is only +9..11% at q=0.9 (most of a defective
tire is normal tire) but +14..25% at q=0.99: flagged 5/5 (z 4.3..7.1); 20 good + 20 defect
images 5/5 (z 3.8..5.8); 32 good + 8 defect 1/5; noise 5/5; honest or held-out good 0/5 (max z
1.3). A 5% floor hid every real poisoner (z <= 3.4); no floor gave honest z up to 8 (five MADs
are noisy). q=0.999 flagged held-out good images (benign test/validation shift) 3/5.

Limits.
- Needs at least 3 factories (with 2, each is the other's only reference and the median/MAD of
  two values cannot say which one is odd) and an honest majority: the median must be an honest
  factory's value. Colluding poisoners that send similar vectors are each other's neighbours and
  can hide together.
- Non-IID partitions (e.g. one product category per factory) make honest factories look distant
  from one another: compare factories within a category, not across categories.
- A poisoner that sends only a few defect vectors among many normal ones can stay below the
  threshold (its quantile statistic is still an honest-looking one); `filter` cannot remove what
  was not flagged.
- A high quantile of a small payload rests on a handful of vectors (the 99th percentile of 300
  vectors is the 3rd largest): with payloads of a few hundred vectors, prefer a lower quantile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from federated.config import POISON_MODES as MODES  # named with the config, which checks them without torch
from patchcore.distances import squared_norms
from patchcore.errors import ConfigError

MAD_TO_SD = 1.4826  # MAD × this = standard deviation for normally distributed data


@dataclass
class PoisonReport:
    """What the detector saw and decided; `to_dict()` is JSON-ready."""

    scores: dict[int, float]  # factory id -> s_k, the `quantile` of its LOO distances
    z: dict[int, float]  # factory id -> robust z-score of s_k (empty when no detection ran)
    flagged: list[int]  # factory ids with z_k > threshold, ascending
    reasons: dict[int, str]  # flagged factory id -> one-line explanation
    threshold: float
    quantile: float
    median: float = float("nan")  # median of the scores
    sigma: float = float("nan")  # 1.4826 × MAD (floored) of the scores
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; NaN/inf become None, integer keys become strings."""
        d = asdict(self)
        for key in ("scores", "z", "reasons"):
            d[key] = {str(k): _finite(v) for k, v in d[key].items()}
        for key in ("threshold", "quantile", "median", "sigma"):
            d[key] = _finite(d[key])
        return d


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _check_features(features: Mapping[int, torch.Tensor]) -> int:
    """Validate shapes; returns the common dimension D (0 when there are no factories)."""
    dims = {int(x.shape[1]) for x in features.values() if x.ndim == 2}
    bad = [k for k, x in features.items() if x.ndim != 2]
    if bad or len(dims) > 1:
        shapes = {k: tuple(x.shape) for k, x in features.items()}
        raise ValueError(f"factory features must be (n_k, D) with one common D, got {shapes}")
    return dims.pop() if dims else 0


def loo_distances(
    features: Mapping[int, torch.Tensor], chunk: int = 4096, device: torch.device | str | None = None
) -> dict[int, torch.Tensor]:
    """Leave-one-out nearest-neighbour distance of every vector of every factory.

    features: factory id -> (n_k, D). Returns factory id -> (n_k,) float32 on the CPU: the L2
    distance from each vector of factory k to its nearest vector among all other factories'
    vectors (+inf when no other factory sent any). Both queries and references are processed in
    blocks of `chunk` rows, so memory stays at a (chunk, chunk) block whatever the sizes.
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    _check_features(features)
    dev = torch.device(device) if device is not None else None
    xs = {k: x.to(device=x.device if dev is None else dev, dtype=torch.float32) for k, x in features.items()}
    norms = {k: squared_norms(x) for k, x in xs.items()}  # (n_k,)
    out: dict[int, torch.Tensor] = {}
    for k, q_all in xs.items():
        best = torch.full((len(q_all),), math.inf, device=q_all.device)  # (n_k,) squared
        for qs in range(0, len(q_all), chunk):
            q, q_sq = q_all[qs : qs + chunk], norms[k][qs : qs + chunk]  # (c, D), (c,)
            for j, ref_all in xs.items():
                if j == k:
                    continue
                for rs in range(0, len(ref_all), chunk):
                    ref = ref_all[rs : rs + chunk].to(q.device)  # (r, D)
                    r_sq = norms[j][rs : rs + chunk].to(q.device)  # (r,)
                    d2 = torch.addmm(r_sq.unsqueeze(0), q, ref.T, beta=1.0, alpha=-2.0)  # (c, r)
                    d2.add_(q_sq.unsqueeze(1))
                    best[qs : qs + chunk] = torch.minimum(best[qs : qs + chunk], d2.min(dim=1).values)
        out[k] = best.clamp_(min=0.0).sqrt_().cpu()
    return out


def _check_params(quantile: float, threshold: float, min_factories: int, mad_floor: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"federation.poison_quantile must be in (0, 1], got {quantile}")
    if not threshold > 0.0:
        raise ConfigError(f"federation.poison_threshold must be > 0, got {threshold}")
    if min_factories < 3:
        raise ConfigError(f"min_factories must be >= 3 (median/MAD need 3 values), got {min_factories}")
    if not mad_floor >= 0.0:
        raise ConfigError(f"mad_floor must be >= 0, got {mad_floor}")


def _robust_z(scores: dict[int, float], mad_floor: float) -> tuple[dict[int, float], float, float]:
    """z_k = (s_k - median) / (1.4826 · max(MAD, mad_floor · |median|)); returns (z, median, sigma)."""
    s = torch.tensor(list(scores.values()), dtype=torch.float64)
    med = float(s.quantile(0.5))  # the mean of the two middle values for an even count
    mad = float((s - med).abs().quantile(0.5))
    sigma = MAD_TO_SD * max(mad, mad_floor * abs(med), 1e-12)
    return {k: (v - med) / sigma for k, v in scores.items()}, med, sigma


def detect_poisoned(
    features: Mapping[int, torch.Tensor],
    *,
    quantile: float = 0.99,
    threshold: float = 3.5,
    min_factories: int = 3,
    mad_floor: float = 0.02,
    chunk: int = 4096,
    device: torch.device | str | None = None,
) -> tuple[PoisonReport, dict[int, torch.Tensor]]:
    """Flag factories whose `quantile` LOO distance is a robust outlier on the far side.

    features: factory id -> (n_k, D) local coreset. Returns the report and the LOO distances
    (factory id -> (n_k,)) that `mitigate(..., mode="filter")` needs. Factories that sent no
    vectors get no score and are never flagged.
    """
    _check_params(quantile, threshold, min_factories, mad_floor)
    empty = sorted(k for k, x in features.items() if len(x) == 0)
    distances = loo_distances(features, chunk=chunk, device=device)
    scores = {k: float(torch.quantile(d.double(), quantile)) for k, d in sorted(distances.items())
              if k not in empty and len(features) > 1}
    report = PoisonReport(scores=scores, z={}, flagged=[], reasons={}, threshold=threshold, quantile=quantile)
    if empty:
        report.note = f"factories {empty} sent no vectors: not scored; "
    if len(scores) < min_factories:
        report.note += f"fewer than {min_factories} factories with vectors ({len(scores)}): no detection"
        return report, distances
    report.z, report.median, report.sigma = _robust_z(scores, mad_floor)
    pct = f"{100 * quantile:g}th-percentile"
    for k, zk in report.z.items():
        if zk > threshold:
            report.flagged.append(k)
            report.reasons[k] = (
                f"factory-{k}: {pct} distance to other factories' vectors {scores[k]:.3g} is "
                f"{zk:.1f} robust SDs above the median {report.median:.3g} (threshold {threshold:g})"
            )
    report.note = report.note.removesuffix("; ")
    return report, distances


def mitigate(
    features: Mapping[int, torch.Tensor],
    report: PoisonReport,
    distances: Mapping[int, torch.Tensor],
    mode: str,
    *,
    filter_quantile: float | None = 0.9,
) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Apply `mode` to the flagged factories; returns (kept features, dropped vector counts).

    - "off", "flag": everything is kept (flag only reports).
    - "exclude": flagged factories are left out of the kept dict entirely.
    - "filter": a flagged factory keeps only the vectors whose LOO distance is at most the cutoff,
      the largest `filter_quantile` of the unflagged factories' LOO distances (the tail an honest
      factory is allowed to have; None: their detection scores): its normal-looking patches
      stay, the outlying ones go. The cutoff is stricter than the detection quantile on purpose:
      on MVTec tire a 40-defect-image factory's defect-patch vectors were dropped 85% at 0.9 (14%
      of its normal-patch vectors lost) but only 50% at 0.99 (3% lost); the honest factories
      still cover normal patches, so losing some of a flagged factory's normal vectors is cheap.
    `dropped` has an entry (possibly 0) for every factory in `features`.
    """
    if filter_quantile is not None and not 0.0 < filter_quantile <= 1.0:
        raise ConfigError(f"federation.poison_filter_quantile must be in (0, 1], got {filter_quantile}")
    if mode not in MODES:
        raise ConfigError(f"federation.poison_mode must be one of {list(MODES)}, got {mode!r}")
    kept = dict(features)
    dropped = {k: 0 for k in features}
    flagged = [k for k in report.flagged if k in features]
    if mode in ("off", "flag") or not flagged:
        return kept, dropped
    if mode == "exclude":
        for k in flagged:
            dropped[k] = len(kept.pop(k))
        return kept, dropped
    cutoff = _filter_cutoff(report, distances, filter_quantile)
    for k in flagged:
        d = distances.get(k)
        if d is None or len(d) != len(features[k]):
            raise ValueError(f"distances for factory {k} missing or not one per vector ({len(features[k])})")
        keep = d.to(features[k].device) <= cutoff  # (n_k,) bool
        kept[k] = features[k][keep]
        dropped[k] = int((~keep).sum())
    return kept, dropped


def _filter_cutoff(report: PoisonReport, distances: Mapping[int, torch.Tensor], q: float | None) -> float:
    """Largest honest tail: max over unflagged scored factories of their `q` LOO distance."""
    honest = [k for k in report.scores if k not in report.flagged]
    if q is None:
        return max((report.scores[k] for k in honest), default=-math.inf)
    tails = [float(torch.quantile(distances[k].double(), q)) for k in honest if k in distances and len(distances[k])]
    return max(tails, default=-math.inf)
