"""Differential privacy for the feature vectors a factory shares: clip each row, add Gaussian noise.

What is guaranteed: each released vector, taken individually, is (epsilon, delta)-DP with respect
to replacing that one vector's clipped value by any other vector in the clip ball (L2 radius
`clip_norm`, so sensitivity = the ball's diameter, 2 * clip_norm). Sigma comes from the analytic
Gaussian mechanism (Balle & Wang, ICML 2018), exact for every epsilon > 0; the classical formula
is kept for comparison and is a valid bound only for epsilon < 1.

What is NOT covered:
- which vectors are released: the greedy coreset reads every patch to choose them, and that
  data-dependent choice (and the order of the rows) is released unprotected;
- composition: one image yields many patches, and overlapping 3x3 neighbourhoods make nearby
  patches share pixels, so the guarantee per image (or per factory) is far weaker than the per-
  vector one and degrades with the number of its vectors released;
- the counts sent alongside the bank (num_patches, num_images) and any other metadata;
- the query side: scoring test images against the global bank;
- implementation gaps: noise comes from torch's (non-cryptographic) PRNG in floating point, so
  the textbook idealisations of exact real-valued sampling do not hold bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.special import log_ndtr

from patchcore.errors import ConfigError
from patchcore.transform import clip_rows as transform_clip_rows

MECHANISM = "analytic_gaussian (Balle & Wang 2018)"
UNIT = "one released feature vector (replace-one)"
NOT_COVERED = (
    "data-dependent coreset selection; composition over the many (overlapping) patches of one "
    "image or factory; counts and metadata (num_patches, num_images); query-side scoring"
)
_MAX_BRACKET_STEPS = 2000  # doublings/halvings of sigma: far beyond any float64 range needed


def _check_epsilon(epsilon: float, allow_inf: bool = True) -> None:
    if not (epsilon > 0) or (math.isinf(epsilon) and not allow_inf):
        raise ConfigError(f"privacy.epsilon must be > 0, got {epsilon}")


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ConfigError(f"privacy.delta must be in (0, 1), got {delta}")


def _check_positive(name: str, value: float) -> None:
    if not (value > 0) or math.isinf(value):
        raise ConfigError(f"privacy.{name} must be a finite number > 0, got {value}")


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta of the Gaussian mechanism N(0, sigma^2) at this epsilon and L2 sensitivity.

    delta = Phi(D/(2s) - e*s/D) - exp(e) * Phi(-D/(2s) - e*s/D)  (Balle & Wang 2018, Thm 8),
    i.e. the hockey-stick divergence between N(0, s^2) and N(D, s^2). Computed as
    Phi(u) * (1 - exp(e + log Phi(v) - log Phi(u))) with log-CDFs, so neither exp(e) overflows
    nor the tiny Phi values underflow for large epsilon. epsilon = 0 gives the total variation.
    """
    _check_positive("sigma", sigma)
    _check_positive("sensitivity", sensitivity)
    if math.isinf(epsilon):
        return 0.0
    if not (epsilon >= 0):
        raise ConfigError(f"privacy.epsilon must be >= 0, got {epsilon}")
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    log_pu = float(log_ndtr(a - b))
    log_ratio = epsilon + float(log_ndtr(-a - b)) - log_pu  # <= 0 in exact arithmetic
    if log_ratio >= 0.0:
        return 0.0
    return max(0.0, math.exp(log_pu) * -math.expm1(log_ratio))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0,
                            tol: float = 1e-12) -> float:
    """Smallest sigma with gaussian_delta(sigma, epsilon, sensitivity) <= delta.

    delta(sigma) is strictly decreasing, so bracket by doubling/halving from sigma = sensitivity,
    then bisect (geometrically) until the bracket's relative width is <= tol. The upper end is
    returned, so the result always satisfies the condition. epsilon = inf -> 0.0 (no noise).
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_positive("sensitivity", sensitivity)
    if not (0 < tol < 1):
        raise ConfigError(f"privacy.tol must be in (0, 1), got {tol}")
    if math.isinf(epsilon):
        return 0.0

    def ok(s: float) -> bool:
        return gaussian_delta(s, epsilon, sensitivity) <= delta

    lo = hi = float(sensitivity)
    for _ in range(_MAX_BRACKET_STEPS):
        if ok(hi):
            break
        lo, hi = hi, hi * 2.0
    else:
        raise ConfigError(f"privacy: no sigma found for epsilon={epsilon}, delta={delta}")
    if lo == hi:  # sigma = sensitivity already works: walk down until it does not
        for _ in range(_MAX_BRACKET_STEPS):
            lo = hi / 2.0
            if not ok(lo):
                break
            hi = lo
        else:
            raise ConfigError(f"privacy: no sigma found for epsilon={epsilon}, delta={delta}")
    while (hi - lo) > tol * hi:  # invariant: ok(hi) and not ok(lo)
        mid = math.sqrt(lo * hi) if hi / lo > 2.0 else 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break  # float resolution reached
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The textbook sigma = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon (Dwork & Roth, A.1).

    Only a valid (epsilon, delta) bound for epsilon < 1; for epsilon >= 1 it may add too little
    noise. Kept for comparison: the analytic sigma is smaller at every epsilon < 1.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_positive("sensitivity", sensitivity)
    if math.isinf(epsilon):
        return 0.0
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def clip_rows(x: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale every row of x (n, D) whose L2 norm exceeds clip_norm down to norm clip_norm.

    Rows within the ball (zero rows included) are unchanged; directions are kept. Returns the
    clipped copy (n, D) and the fraction of rows that were clipped (0.0 when n = 0).
    """
    _check_positive("clip_norm", clip_norm)
    if x.ndim != 2:
        raise ValueError(f"clip_rows expects a 2-D (n, D) tensor, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("clip_rows: x contains NaN or infinite values")
    return transform_clip_rows(x, clip_norm)  # the same clipping the model's transform applies


@dataclass(frozen=True)
class PrivacySpec:
    """The DP parameters of one release; build it with `PrivacySpec.create`.

    sensitivity = 2 * clip_norm: neighbouring releases differ in one vector replaced by any other
    vector in the clip ball, whose diameter bounds the change. epsilon = inf disables the noise
    (clipping still applies) and sigma = 0.
    """

    epsilon: float
    delta: float
    clip_norm: float
    sensitivity: float
    sigma: float

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon)
        _check_delta(self.delta)
        _check_positive("clip_norm", self.clip_norm)
        _check_positive("sensitivity", self.sensitivity)
        if not (self.sigma >= 0) or math.isinf(self.sigma):
            raise ConfigError(f"privacy.sigma must be a finite number >= 0, got {self.sigma}")
        if self.enabled and self.sigma == 0:
            raise ConfigError(f"privacy.sigma must be > 0 when epsilon is finite, got {self.sigma}")

    @classmethod
    def create(cls, epsilon: float, delta: float, clip_norm: float) -> "PrivacySpec":
        """Validate the three user parameters and calibrate sigma analytically."""
        _check_epsilon(epsilon)
        _check_delta(delta)
        _check_positive("clip_norm", clip_norm)
        sensitivity = 2.0 * float(clip_norm)
        sigma = analytic_gaussian_sigma(float(epsilon), float(delta), sensitivity)
        return cls(float(epsilon), float(delta), float(clip_norm), sensitivity, sigma)

    @property
    def enabled(self) -> bool:
        """True when noise is added (epsilon finite)."""
        return math.isfinite(self.epsilon)

    def to_dict(self) -> dict:
        """JSON-ready description for manifests (epsilon = inf is written as the string "inf")."""
        return {
            "epsilon": self.epsilon if self.enabled else "inf",
            "delta": self.delta,
            "clip_norm": self.clip_norm,
            "sensitivity": self.sensitivity,
            "sigma": self.sigma,
            "mechanism": MECHANISM,
            "unit": UNIT,
            "not_covered": NOT_COVERED,
        }


def privatize(x: torch.Tensor, spec: PrivacySpec,
              generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Clip the rows of x (n, D), then add i.i.d. N(0, sigma^2) to every coordinate.

    The noise is drawn on the CPU from `generator` (which must be a CPU generator) and then moved
    to x's device, so one seed gives the same noise on CPU and CUDA. epsilon = inf: clip only.
    Returns the released (n, D) float32 tensor and stats {"fraction_clipped", "sigma",
    "noise_norm_mean"} (the mean L2 norm of a row's noise, about sigma * sqrt(D)).
    """
    if generator.device.type != "cpu":
        raise ValueError(f"privatize needs a CPU torch.Generator, got one on {generator.device}")
    clipped, fraction = clip_rows(x.to(torch.float32), spec.clip_norm)  # (n, D)
    noise_norm_mean = 0.0
    released = clipped
    if spec.enabled and clipped.numel() > 0:
        noise = torch.randn(tuple(clipped.shape), generator=generator, dtype=torch.float32)
        noise = noise * spec.sigma  # (n, D) on the CPU
        noise_norm_mean = float(torch.linalg.vector_norm(noise, dim=1).mean())
        released = clipped + noise.to(clipped.device)
    stats = {"fraction_clipped": fraction, "sigma": spec.sigma,
             "noise_norm_mean": noise_norm_mean}
    return released, stats
