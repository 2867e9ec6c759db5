"""Privacy accounting for releases made of several Gaussian mechanisms: Gaussian DP (μ-GDP).

Gaussian differential privacy (Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022,
arXiv:1905.02383) describes a mechanism by one number μ: distinguishing two neighbouring
datasets from its output is no easier than telling N(0, 1) from N(μ, 1). Three facts make it the
right ledger here:

- one Gaussian mechanism with L2 sensitivity Δ and noise N(0, σ²·I) is exactly (Δ/σ)-GDP;
- the (adaptive) composition of a μ_1-, ..., μ_k-GDP mechanisms is exactly μ-GDP with
  μ = sqrt(μ_1² + ... + μ_k²) (their Corollary 3.3): no slack, unlike summing epsilons;
- μ-GDP is equivalent to (ε, δ(ε))-DP for every ε >= 0 at once, with
  δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)  (their Corollary 2.13),
  which is Balle & Wang's exact delta of one Gaussian mechanism with σ/Δ = 1/μ
  (federated/privacy.py's `gaussian_delta`; reused here, not re-derived).

So a release of several noisy statistics is accounted by adding the squares of their Δ/σ, and
its (ε, δ) statement is exact for that μ: `epsilon_for(mu, delta)` is the smallest ε whose δ(ε)
is <= delta. Given a target (ε, δ) the other way round: `mu_for(epsilon, delta)` is the largest μ
allowed, `split(mu, shares)` divides μ² among the released parts (part i gets μ_i = μ·sqrt(w_i)),
and `sigma_for(sensitivity, mu_i)` = Δ_i / μ_i is the noise each part needs.

Adjacency is whatever the sensitivities were computed for (fedpatch's DP-PaDiM: add or remove one
training image). Post-processing of the released values (the server's sums, projections,
shrinkage, scoring) costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from federated.privacy import _check_delta, analytic_gaussian_sigma, gaussian_delta
from patchcore.errors import ConfigError

_BISECT_STEPS = 200


def _check_mu(mu: float) -> None:
    if not (mu >= 0) or math.isnan(mu):
        raise ConfigError(f"privacy: GDP mu must be >= 0 (inf = no privacy), got {mu}")


def gdp_mu(sensitivities: Iterable[float], sigmas: Iterable[float]) -> float:
    """μ of the composition of Gaussian mechanisms with these L2 sensitivities and noise scales:
    sqrt(Σ (Δ_i/σ_i)²). A part with σ = 0 (no noise) makes μ = inf; a part with Δ = 0 adds 0."""
    sens, sig = list(sensitivities), list(sigmas)
    if len(sens) != len(sig):
        raise ConfigError(f"gdp_mu: {len(sens)} sensitivities but {len(sig)} sigmas")
    total = 0.0
    for d, s in zip(sens, sig):
        if not (d >= 0) or math.isinf(d):
            raise ConfigError(f"gdp_mu: sensitivity must be a finite number >= 0, got {d}")
        if not (s >= 0) or math.isinf(s):
            raise ConfigError(f"gdp_mu: sigma must be a finite number >= 0, got {s}")
        if d == 0:
            continue
        if s == 0:
            return math.inf
        total += (d / s) ** 2
    return math.sqrt(total)


def compose(mus: Iterable[float]) -> float:
    """μ of the composition of μ_i-GDP mechanisms: sqrt(Σ μ_i²)."""
    mus = list(mus)
    for m in mus:
        _check_mu(m)
    return math.inf if any(math.isinf(m) for m in mus) else math.sqrt(sum(m * m for m in mus))


def delta_for(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (= gaussian_delta with σ = 1, Δ = μ).
    μ = 0 gives 0 (no information released), μ = inf gives 1 (no privacy)."""
    _check_mu(mu)
    if not (epsilon >= 0):
        raise ConfigError(f"privacy: epsilon must be >= 0, got {epsilon}")
    if mu == 0 or math.isinf(epsilon):
        return 0.0
    if math.isinf(mu):
        return 1.0
    return gaussian_delta(1.0, float(epsilon), float(mu))


def epsilon_for(mu: float, delta: float) -> float:
    """The smallest ε >= 0 with δ_μ(ε) <= delta: the (ε, δ)-DP statement μ-GDP implies at this δ.
    δ_μ(ε) is strictly decreasing in ε, so bracket and bisect; the upper end is returned (safe).
    μ = 0 -> 0; μ = inf -> inf."""
    _check_mu(mu)
    _check_delta(delta)
    if mu == 0 or delta_for(mu, 0.0) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    lo, hi = 0.0, max(1.0, mu * mu)
    while delta_for(mu, hi) > delta:
        lo, hi = hi, 2.0 * hi
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if delta_for(mu, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def mu_for(epsilon: float, delta: float) -> float:
    """The largest μ whose μ-GDP implies (ε, δ)-DP: 1/σ of the analytic Gaussian mechanism with
    sensitivity 1 (federated.privacy.analytic_gaussian_sigma, whose σ satisfies the condition, so
    this μ does too). ε = inf -> inf (no noise)."""
    if not (epsilon > 0):
        raise ConfigError(f"privacy: epsilon must be > 0, got {epsilon}")
    _check_delta(delta)
    if math.isinf(epsilon):
        return math.inf
    return 1.0 / analytic_gaussian_sigma(float(epsilon), float(delta), 1.0)


def split(mu: float, shares: Mapping[str, float]) -> dict[str, float]:
    """Divide a μ-GDP budget among named parts by their shares of μ² (normalised to sum to 1):
    part i gets μ_i = μ·sqrt(w_i / Σw), so compose(result) == μ. Shares of 0 get μ_i = 0."""
    _check_mu(mu)
    if not shares:
        raise ConfigError("privacy: no parts to split the budget among")
    for name, w in shares.items():
        if not (w >= 0) or math.isinf(w):
            raise ConfigError(f"privacy: budget share of {name!r} must be a finite number >= 0, got {w}")
    total = float(sum(shares.values()))
    if total <= 0:
        raise ConfigError("privacy: budget shares are all 0")
    return {name: (math.inf if math.isinf(mu) and w > 0 else mu * math.sqrt(w / total))
            for name, w in shares.items()}


def sigma_for(sensitivity: float, mu: float) -> float:
    """Noise scale that makes a Gaussian mechanism with this sensitivity exactly μ-GDP: Δ/μ
    (0 when μ = inf: no noise)."""
    if not (sensitivity >= 0) or math.isinf(sensitivity):
        raise ConfigError(f"privacy: sensitivity must be a finite number >= 0, got {sensitivity}")
    if not (mu > 0):
        raise ConfigError(f"privacy: mu must be > 0 for a part that is released, got {mu}")
    return 0.0 if math.isinf(mu) else sensitivity / mu


@dataclass(frozen=True)
class Part:
    """One released statistic: its L2 sensitivity (for the adjacency stated) and noise scale."""

    name: str
    sensitivity: float
    sigma: float

    @property
    def mu(self) -> float:
        """Δ/σ; inf when no noise is added to a part that depends on the data (σ = 0)."""
        if self.sigma == 0:
            return math.inf if self.sensitivity > 0 else 0.0
        return gdp_mu([self.sensitivity], [self.sigma])


@dataclass(frozen=True)
class Ledger:
    """Everything one party releases, accounted together: μ = sqrt(Σ μ_i²) and its (ε, δ)."""

    parts: tuple[Part, ...] = field(default_factory=tuple)
    unit: str = "one training image (add/remove)"

    @property
    def mu(self) -> float:
        return compose(p.mu for p in self.parts)

    def epsilon(self, delta: float) -> float:
        return epsilon_for(self.mu, delta)

    def to_dict(self, delta: float) -> dict:
        """JSON-ready (an infinite value is written as the string "inf")."""
        def num(x: float):
            return "inf" if math.isinf(x) else x
        return {"unit": self.unit, "accounting": "Gaussian DP (Dong, Roth & Su 2019), exact composition",
                "mu": num(self.mu), "delta": delta, "epsilon": num(self.epsilon(delta)),
                "parts": [{"name": p.name, "sensitivity": num(p.sensitivity), "sigma": p.sigma, "mu": num(p.mu)}
                          for p in self.parts]}
