"""Gaussian-DP accounting (federated/accounting.py) against known values and an independent
computation: delta of μ-GDP, exact composition, the (ε, δ) <-> μ conversions, budget splits."""

from __future__ import annotations

import json
import math

import pytest
from scipy import integrate, optimize
from scipy.stats import norm

from federated.accounting import (
    Ledger,
    Part,
    compose,
    delta_for,
    epsilon_for,
    gdp_mu,
    mu_for,
    sigma_for,
    split,
)
from federated.privacy import analytic_gaussian_sigma, classical_gaussian_sigma, gaussian_delta
from patchcore.errors import ConfigError


def gdp_delta_direct(mu: float, epsilon: float) -> float:
    """Dong, Roth & Su (2019), Corollary 2.13, written out with scipy's normal CDF."""
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


def hockey_stick(mu: float, epsilon: float) -> float:
    """∫ max(0, p − e^ε q) for p = N(0, 1), q = N(μ, 1): the definition, by quadrature."""
    x_star = mu / 2 - epsilon / mu  # p > e^ε q exactly below this point

    def f(x: float) -> float:
        return norm.pdf(x) * -math.expm1(epsilon - (mu * mu - 2 * x * mu) / 2)

    return integrate.quad(f, x_star - 40, x_star, epsabs=0, epsrel=1e-11, limit=200)[0]


def test_one_gdp_at_epsilon_one_is_the_published_delta():
    # μ = 1 at ε = 1: δ = Φ(−1/2) − e Φ(−3/2) = 0.1269 (Dong, Roth & Su's running example)
    assert delta_for(1.0, 1.0) == pytest.approx(0.126936, abs=1e-6)
    # ε = 0: the total variation between N(0, 1) and N(1, 1), 2Φ(1/2) − 1
    assert delta_for(1.0, 0.0) == pytest.approx(2 * norm.cdf(0.5) - 1, rel=1e-12)
    assert delta_for(1.0, 0.0) == pytest.approx(0.382925, abs=1e-6)


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 1.67, 3.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 4.0, 8.0])
def test_delta_matches_the_formula_and_the_hockey_stick_integral(mu, epsilon):
    closed = delta_for(mu, epsilon)
    assert closed == pytest.approx(gdp_delta_direct(mu, epsilon), rel=1e-9, abs=1e-15)
    assert closed == pytest.approx(hockey_stick(mu, epsilon), rel=1e-7, abs=1e-14)


def test_composition_of_k_identical_mechanisms_is_sqrt_k_mu():
    for k in (1, 2, 4, 9, 100):
        assert compose([0.3] * k) == pytest.approx(math.sqrt(k) * 0.3, rel=1e-12)
        # k Gaussian mechanisms (Δ, σ) = one Gaussian mechanism with σ/sqrt(k): same ε at every δ
        mu = gdp_mu([2.0] * k, [5.0] * k)
        assert mu == pytest.approx(math.sqrt(k) * 2.0 / 5.0, rel=1e-12)
        one = gaussian_delta(5.0 / math.sqrt(k), 3.0, 2.0)
        assert delta_for(mu, 3.0) == pytest.approx(one, rel=1e-9)
    assert compose([0.6, 0.8]) == pytest.approx(1.0, rel=1e-12)
    assert gdp_mu([1.0, 0.0], [2.0, 0.0]) == 0.5  # a part that depends on no data adds nothing
    assert gdp_mu([1.0], [0.0]) == math.inf  # released without noise


@pytest.mark.parametrize("epsilon", [0.25, 1.0, 4.0, 8.0, 32.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_mu_and_epsilon_invert_each_other_and_meet_delta(epsilon, delta):
    mu = mu_for(epsilon, delta)
    assert delta_for(mu, epsilon) <= delta * (1 + 1e-6)
    assert delta_for(mu * 1.001, epsilon) > delta  # tight: a larger μ breaks it
    assert epsilon_for(mu, delta) == pytest.approx(epsilon, rel=1e-6)
    # an independent root-finder on the written-out formula
    direct = optimize.brentq(lambda m: gdp_delta_direct(m, epsilon) - delta, 1e-4, 100, xtol=1e-14)
    assert mu == pytest.approx(direct, rel=1e-6)


def test_known_mu_values_at_delta_1e5_and_the_analytic_gaussian_sigma():
    # μ(ε, 1e-5): the budgets the study runs at
    for epsilon, mu in ((1.0, 0.26805), (4.0, 0.92493), (8.0, 1.66603)):
        assert mu_for(epsilon, 1e-5) == pytest.approx(mu, abs=2e-5)
    # the analytic Gaussian's σ for Δ = 1 is 1/μ, below the classical sqrt(2 ln(1.25/δ))/ε = 4.845 at ε = 1
    sigma = analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    assert 1 / mu_for(1.0, 1e-5) == pytest.approx(sigma, rel=1e-9)
    assert sigma == pytest.approx(3.7306, abs=1e-3)
    assert sigma < classical_gaussian_sigma(1.0, 1e-5) == pytest.approx(4.845, abs=1e-3)


def test_split_spends_exactly_the_budget_and_sigma_for_calibrates_each_part():
    mu = mu_for(8.0, 1e-5)
    parts = split(mu, {"count": 0.05, "second": 0.45, "scale": 0.25, "unused": 0.0})
    assert parts["unused"] == 0.0
    assert compose(parts.values()) == pytest.approx(mu, rel=1e-12)
    assert parts["second"] / parts["scale"] == pytest.approx(math.sqrt(0.45 / 0.25), rel=1e-12)
    sens = {"count": 1.0, "second": 280.0, "scale": 7600.0}
    sigmas = {k: sigma_for(sens[k], parts[k]) for k in sens}
    assert gdp_mu(list(sens.values()), list(sigmas.values())) == pytest.approx(mu, rel=1e-12)
    ledger = Ledger(tuple(Part(k, sens[k], sigmas[k]) for k in sens))
    assert ledger.epsilon(1e-5) == pytest.approx(8.0, rel=1e-6)
    assert sigma_for(3.0, math.inf) == 0.0


def test_ledger_json_and_infinite_budget():
    free = Ledger((Part("sums", 2.0, 0.0),))
    assert free.mu == math.inf and free.epsilon(1e-5) == math.inf
    d = free.to_dict(1e-5)
    assert d["mu"] == "inf" and d["epsilon"] == "inf"
    json.dumps(d, allow_nan=False)
    assert Ledger().mu == 0.0 and Ledger().epsilon(1e-5) == 0.0
    assert epsilon_for(0.0, 1e-5) == 0.0 and delta_for(0.0, 1.0) == 0.0


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        gdp_mu([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError):
        gdp_mu([-1.0], [1.0])
    with pytest.raises(ConfigError):
        compose([-0.1])
    with pytest.raises(ConfigError):
        mu_for(0.0, 1e-5)
    with pytest.raises(ConfigError):
        epsilon_for(1.0, 0.0)
    with pytest.raises(ConfigError):
        split(1.0, {"a": 0.0})
    with pytest.raises(ConfigError):
        split(1.0, {"a": -1.0})
    with pytest.raises(ConfigError):
        sigma_for(1.0, 0.0)
