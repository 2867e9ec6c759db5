"""Tests for federated/privacy.py: analytic Gaussian calibration, clipping, privatize."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import integrate, optimize

from federated.privacy import (
    PrivacySpec,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    clip_rows,
    gaussian_delta,
    privatize,
)
from patchcore.errors import ConfigError

EPSILONS = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def hockey_stick_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """delta by quadrature: integral of max(0, p - e^eps q), p = N(0, s^2), q = N(D, s^2).

    Independent of the closed form: p > e^eps q exactly where log(p/q) = (D^2 - 2xD)/(2s^2) > eps,
    i.e. x < x_star; the integrand is written as p * (1 - exp(eps - log(p/q))) so it does not
    cancel catastrophically for large epsilon.
    """
    x_star = sensitivity / 2.0 - epsilon * sigma**2 / sensitivity

    def integrand(x: float) -> float:
        log_p = -0.5 * (x / sigma) ** 2 - math.log(sigma * math.sqrt(2.0 * math.pi))
        log_ratio = (sensitivity**2 - 2.0 * x * sensitivity) / (2.0 * sigma**2)
        return math.exp(log_p) * -math.expm1(epsilon - log_ratio)

    lower = min(x_star, 0.0) - 40.0 * sigma
    value, _ = integrate.quad(integrand, lower, x_star, epsabs=0.0, epsrel=1e-11, limit=200)
    return value


@pytest.mark.parametrize("sensitivity", [1.0, 2.5])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_analytic_sigma_meets_condition_and_is_tight(epsilon, delta, sensitivity):
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    assert sigma > 0
    assert gaussian_delta(sigma, epsilon, sensitivity) <= delta * (1 + 1e-6)
    assert gaussian_delta(0.99 * sigma, epsilon, sensitivity) > delta


@pytest.mark.parametrize("sigma,epsilon,sensitivity", [
    (3.0, 1.0, 1.0), (1.0, 2.0, 1.0), (0.6, 8.0, 1.0), (0.9, 16.0, 2.5), (6.0, 0.5, 2.5),
    (0.2, 40.0, 1.0),
])
def test_gaussian_delta_matches_hockey_stick_integral(sigma, epsilon, sensitivity):
    closed = gaussian_delta(sigma, epsilon, sensitivity)
    numeric = hockey_stick_delta(sigma, epsilon, sensitivity)
    assert numeric > 0
    assert closed == pytest.approx(numeric, rel=1e-4)


def test_gaussian_delta_is_finite_where_naive_exp_overflows():
    # exp(800) overflows a float; the log-space form must still give a sane delta in [0, 1].
    with pytest.raises(OverflowError):
        math.exp(800.0)
    sigma = analytic_gaussian_sigma(800.0, 1e-5, 1.0)
    d = gaussian_delta(sigma, 800.0, 1.0)
    assert math.isfinite(sigma) and sigma > 0
    assert 0.0 <= d <= 1e-5 * (1 + 1e-6)
    assert gaussian_delta(0.99 * sigma, 800.0, 1.0) > 1e-5


def test_hand_checked_sigma_eps1_delta1e5():
    """sigma(eps=1, delta=1e-5, D=1) against a root found with the quadrature delta only."""
    sigma = analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    reference = optimize.brentq(
        lambda s: math.log(hockey_stick_delta(s, 1.0, 1.0)) - math.log(1e-5), 2.0, 6.0,
        xtol=1e-10, rtol=1e-12)
    print(f"analytic sigma(eps=1, delta=1e-5, D=1) = {sigma:.8f}; quadrature root = {reference:.8f}")
    assert sigma == pytest.approx(reference, rel=1e-6)
    assert sigma == pytest.approx(3.7306316, abs=1e-6)


@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_analytic_below_classical_for_small_epsilon_and_decreasing(delta):
    small = [e for e in EPSILONS if e < 1]
    for e in small:
        assert analytic_gaussian_sigma(e, delta) < classical_gaussian_sigma(e, delta)
    sigmas = [analytic_gaussian_sigma(e, delta) for e in EPSILONS]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


def test_sigma_scales_linearly_with_sensitivity_and_inf_is_zero():
    base = analytic_gaussian_sigma(2.0, 1e-5, 1.0)
    assert analytic_gaussian_sigma(2.0, 1e-5, 3.0) == pytest.approx(3.0 * base, rel=1e-9)
    assert analytic_gaussian_sigma(math.inf, 1e-5, 1.0) == 0.0
    assert classical_gaussian_sigma(1.0, 1e-5) == pytest.approx(math.sqrt(2 * math.log(1.25e5)))


def test_clip_rows_hand_case():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 1.8, 2.4]])  # norms 0, 0.5, 3
    original = x.clone()
    clipped, fraction = clip_rows(x, 1.0)
    norms = torch.linalg.vector_norm(clipped, dim=1)
    assert torch.allclose(norms, torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)
    assert torch.allclose(clipped, torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0],
                                                 [0.0, 0.6, 0.8]]), atol=1e-6)
    assert fraction == pytest.approx(1 / 3)
    assert not torch.isnan(clipped).any()
    assert torch.equal(x, original)  # a copy, input untouched


def test_clip_rows_rejects_bad_clip_norm():
    with pytest.raises(ConfigError, match="privacy.clip_norm"):
        clip_rows(torch.ones(2, 3), 0.0)


def _features(n: int = 50, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, d, generator=g)  # (n, d), norms ~ 8: most rows get clipped


def test_privatize_is_reproducible_per_seed():
    x = _features()
    spec = PrivacySpec.create(epsilon=2.0, delta=1e-5, clip_norm=1.0)
    a, stats = privatize(x, spec, torch.Generator().manual_seed(7))
    b, _ = privatize(x, spec, torch.Generator().manual_seed(7))
    c, _ = privatize(x, spec, torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert stats["sigma"] == spec.sigma and stats["fraction_clipped"] > 0.9
    assert stats["noise_norm_mean"] > 0


def test_privatize_infinite_epsilon_only_clips():
    x = _features()
    spec = PrivacySpec.create(epsilon=math.inf, delta=1e-5, clip_norm=1.0)
    assert not spec.enabled and spec.sigma == 0.0
    released, stats = privatize(x, spec, torch.Generator().manual_seed(0))
    clipped, _ = clip_rows(x, 1.0)
    assert torch.equal(released, clipped)
    assert stats["noise_norm_mean"] == 0.0


def test_privatize_noise_has_calibrated_std():
    x = _features(n=2000, d=64, seed=1)
    spec = PrivacySpec.create(epsilon=4.0, delta=1e-5, clip_norm=0.5)
    released, stats = privatize(x, spec, torch.Generator().manual_seed(3))
    clipped, _ = clip_rows(x, 0.5)
    noise = (released - clipped).double()
    assert float(noise.std()) == pytest.approx(spec.sigma, rel=0.03)
    assert abs(float(noise.mean())) < 0.03 * spec.sigma
    assert stats["noise_norm_mean"] == pytest.approx(spec.sigma * math.sqrt(64), rel=0.03)


@pytest.mark.cuda
def test_privatize_same_noise_on_cuda():
    x = _features()
    spec = PrivacySpec.create(epsilon=2.0, delta=1e-5, clip_norm=1.0)
    cpu, _ = privatize(x, spec, torch.Generator().manual_seed(5))
    gpu, _ = privatize(x.cuda(), spec, torch.Generator().manual_seed(5))
    clipped_cpu, _ = clip_rows(x, 1.0)
    clipped_gpu, _ = clip_rows(x.cuda(), 1.0)
    assert gpu.device.type == "cuda"
    # identical noise; clipping may differ in the last bit between devices
    assert torch.allclose(gpu.cpu() - clipped_gpu.cpu(), cpu - clipped_cpu, atol=1e-5)


def test_spec_create_fields_and_manifest_dict():
    spec = PrivacySpec.create(epsilon=1.0, delta=1e-5, clip_norm=0.5)
    assert spec.sensitivity == 1.0
    assert spec.sigma == pytest.approx(analytic_gaussian_sigma(1.0, 1e-5, 1.0))
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["epsilon"] == 1.0 and d["sigma"] == spec.sigma
    assert d["mechanism"] == "analytic_gaussian (Balle & Wang 2018)"
    assert d["unit"] == "one released feature vector (replace-one)"
    assert "coreset" in d["not_covered"]
    off = json.loads(json.dumps(PrivacySpec.create(math.inf, 1e-5, 1.0).to_dict()))
    assert off["epsilon"] == "inf" and off["sigma"] == 0.0


@pytest.mark.parametrize("kwargs,key", [
    (dict(epsilon=-1.0, delta=1e-5, clip_norm=1.0), "privacy.epsilon"),
    (dict(epsilon=0.0, delta=1e-5, clip_norm=1.0), "privacy.epsilon"),
    (dict(epsilon=math.nan, delta=1e-5, clip_norm=1.0), "privacy.epsilon"),
    (dict(epsilon=1.0, delta=0.0, clip_norm=1.0), "privacy.delta"),
    (dict(epsilon=1.0, delta=1.0, clip_norm=1.0), "privacy.delta"),
    (dict(epsilon=1.0, delta=math.nan, clip_norm=1.0), "privacy.delta"),
    (dict(epsilon=1.0, delta=1e-5, clip_norm=0.0), "privacy.clip_norm"),
    (dict(epsilon=1.0, delta=1e-5, clip_norm=-2.0), "privacy.clip_norm"),
    (dict(epsilon=1.0, delta=1e-5, clip_norm=math.nan), "privacy.clip_norm"),
])
def test_bad_parameters_raise_config_error_naming_key(kwargs, key):
    with pytest.raises(ConfigError, match=key) as info:
        PrivacySpec.create(**kwargs)
    assert "\n" not in str(info.value)


def test_analytic_sigma_rejects_bad_sensitivity():
    with pytest.raises(ConfigError, match="privacy.sensitivity"):
        analytic_gaussian_sigma(1.0, 1e-5, sensitivity=0.0)
    with pytest.raises(ConfigError, match="privacy.sensitivity"):
        analytic_gaussian_sigma(1.0, 1e-5, sensitivity=math.nan)
