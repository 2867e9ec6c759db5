"""DP-PaDiM (federated/dp_padim.py): the noise actually applied is the stated σ, per-image
clipping bounds what one image can move, ε = inf is PaDiM exactly, the ledger spends the stated
budget, and a private model at a generous ε still finds anomalies."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from federated.accounting import mu_for
from federated.dp_padim import (
    Clips,
    DpPadim,
    DpPadimSpec,
    aggregate,
    block_ids,
    channel_subset,
    fit_federated,
    public_clips,
    release,
)
from patchcore.config import ModelConfig
from patchcore.errors import ConfigError
from patchcore.metrics import image_auroc
from patchcore.padim import Padim, PadimStats

GRID = (4, 4)


def _emb(n: int, dim: int = 6, seed: int = 0, grid=GRID) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    positions = grid[0] * grid[1]
    base = torch.linspace(-2, 2, positions).reshape(1, positions, 1)  # position-dependent structure
    return (torch.randn(n, positions, dim, generator=g) + base * torch.arange(1, dim + 1) / dim).float()


def _noiseless(spec: DpPadimSpec, emb: torch.Tensor, grid=GRID):
    indices = channel_subset(emb.shape[-1], spec)
    return release(emb, grid, replace(spec, epsilon=math.inf), indices, torch.Generator().manual_seed(0))


def test_applied_noise_has_the_stated_sigma():
    spec = DpPadimSpec(epsilon=2.0, dims=None, centre="none", mean_block=2, cov_block=None, scale_block=2,
                       clips=Clips(mean=3.0, second=5.0, scale=4.0))
    emb = _emb(5)
    indices = channel_subset(emb.shape[-1], spec)
    exact = _noiseless(spec, emb)
    sigma = spec.sigmas()
    draws = [release(emb, GRID, spec, indices, torch.Generator().manual_seed(k)) for k in range(400)]
    count = np.array([r.count - exact.count for r in draws])
    mean = torch.stack([r.mean - exact.mean for r in draws])  # (400, G_m, d)
    second = torch.stack([r.second - exact.second for r in draws])  # (400, 1, d, d)
    scale = torch.stack([r.scale - exact.scale for r in draws])
    assert count.std() == pytest.approx(sigma["count"], rel=0.1)
    assert float(mean.std()) == pytest.approx(sigma["mean"], rel=0.05)
    assert float(scale.std()) == pytest.approx(sigma["scale"], rel=0.1)
    d = second.shape[-1]
    diag = second.diagonal(dim1=2, dim2=3)
    rows, cols = torch.triu_indices(d, d, offset=1)
    off = second[:, 0, rows, cols]
    assert float(diag.std()) == pytest.approx(sigma["second"], rel=0.08)
    assert float(off.std()) == pytest.approx(sigma["second"] / math.sqrt(2), rel=0.06)  # σ on sqrt(2)·B_ij
    torch.testing.assert_close(second, second.transpose(2, 3))  # symmetric noise
    # the means are noise-free in expectation (nothing added but zero-mean noise)
    assert abs(float(mean.mean())) < 4 * sigma["mean"] / math.sqrt(mean.numel())
    # and σ_i = Δ_i / (μ·sqrt(share_i)): the stated budget, spent exactly
    mu = mu_for(2.0, 1e-5)
    shares = dict(spec.shares)
    total = sum(shares[p] for p in spec.released())
    assert sigma["second"] == pytest.approx(5.0 / (mu * math.sqrt(shares["second"] / total)), rel=1e-9)
    assert spec.ledger().epsilon(1e-5) == pytest.approx(2.0, rel=1e-6)


def test_per_image_clipping_hand_computed_and_bounds_one_image():
    spec = DpPadimSpec(epsilon=math.inf, dims=None, centre="none", mean_block=None, cov_block=None,
                       scale_block=None, clips=Clips(mean=2.5, second=5.0))
    # one image on a 1 x 2 grid, both patches (3, 4): mean (3, 4) norm 5 -> (1.5, 2.0);
    # B = [[9, 12], [12, 16]], Frobenius 25 -> B/5 = [[1.8, 2.4], [2.4, 3.2]]
    one = torch.tensor([[[3.0, 4.0], [3.0, 4.0]]])
    r = release(one, (1, 2), spec, torch.arange(2), torch.Generator())
    torch.testing.assert_close(r.mean, torch.tensor([[1.5, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(r.second[0], torch.tensor([[1.8, 2.4], [2.4, 3.2]], dtype=torch.float64))
    released = torch.cat([r.second[0].diagonal(), math.sqrt(2) * r.second[0][0, 1:]])  # what gets noise
    assert float(released.norm()) == pytest.approx(5.0)  # the vector's norm is ||B||_F = the radius
    assert r.clipped == {"mean": 1.0, "second": 1.0}  # the one image was clipped in both
    # any image, however extreme, moves every released sum by at most its radius (add/remove one)
    spec = DpPadimSpec(epsilon=math.inf, dims=None, centre="image", mean_block=2, cov_block=4, scale_block=2,
                       clips=Clips(mean=1.0, second=2.0, scale=3.0))
    base = _emb(6)
    for extra in (_emb(1, seed=3) * 1e4, _emb(1, seed=4) * 1e-3, torch.full((1, 16, 6), 7.0)):
        with_it, without = _noiseless(spec, torch.cat([base, extra])), _noiseless(spec, base)
        assert with_it.count - without.count == 1
        for name, radius in (("mean", 1.0), ("second", 2.0), ("scale", 3.0)):
            moved = float((getattr(with_it, name) - getattr(without, name)).norm())
            assert moved <= radius * (1 + 1e-9)
    big = _noiseless(spec, _emb(1, seed=3) * 1e4)
    assert float(big.second.norm()) == pytest.approx(2.0) and float(big.scale.norm()) == pytest.approx(3.0)


def test_epsilon_inf_without_clipping_is_padim_exactly():
    spec = DpPadimSpec(epsilon=math.inf, dims=4, seed=3, centre="none", mean_block=1, cov_block=1, scale_block=None)
    sites = [_emb(5, seed=1), _emb(7, seed=2), _emb(4, seed=3)]
    model, releases = fit_federated(sites, GRID, spec, noise_seed=0)
    every = torch.cat(sites)
    padim = Padim(ModelConfig(), dims=4, seed=3).fit_embeddings(every, GRID)
    torch.testing.assert_close(model.indices, padim.indices)
    stats = PadimStats.from_embeddings(padim.select(every))
    total = aggregate(releases)
    assert total.count == stats.count == 16
    torch.testing.assert_close(total.mean, stats.sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total.second, stats.outer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.gaussian.mean, padim.gaussian.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.gaussian.cov, padim.gaussian.cov, rtol=1e-10, atol=1e-10)
    query = _emb(3, seed=9)
    torch.testing.assert_close(model.patch_scores(query), padim.patch_scores(query), rtol=1e-5, atol=1e-5)
    assert spec.ledger().mu == math.inf  # and it says so: no privacy


def test_image_centring_releases_no_mean_and_the_ledger_counts_what_is_sent():
    spec = DpPadimSpec(epsilon=4.0, clips=Clips(mean=1.0, second=1.0, scale=1.0))
    assert spec.released() == ("second", "scale")  # no mean, so no count either
    r = release(_emb(3), GRID, spec, channel_subset(6, spec), torch.Generator().manual_seed(0))
    assert float(r.mean.abs().max()) == 0.0  # identically zero, not sent
    assert [p.name for p in r.ledger.parts] == ["second", "scale"] and r.count is None
    assert r.ledger.epsilon(1e-5) == pytest.approx(4.0, rel=1e-6)
    with_mean = DpPadimSpec(epsilon=4.0, mean_block=2, clips=Clips(1.0, 1.0, 1.0))
    assert with_mean.released() == ("count", "mean", "second", "scale")
    assert with_mean.ledger().epsilon(1e-5) == pytest.approx(4.0, rel=1e-6)


def test_spec_refuses_what_would_break_the_guarantee_or_the_blocks():
    with pytest.raises(ConfigError, match="finite clip radius"):
        DpPadimSpec(epsilon=8.0)  # a finite ε with unbounded sensitivity
    with pytest.raises(ConfigError, match="budget share"):
        DpPadimSpec(epsilon=8.0, clips=Clips(1.0, 1.0, 1.0), shares=(("count", 1.0), ("second", 1.0)))
    with pytest.raises(ConfigError, match="multiple"):
        DpPadimSpec(epsilon=math.inf, scale_block=3, cov_block=4)
    with pytest.raises(ConfigError):
        DpPadimSpec(epsilon=0.0)
    with pytest.raises(ConfigError):
        Clips(second=0.0)
    ids, groups = block_ids((5, 5), 2)
    assert groups == 9 and ids.reshape(5, 5)[4, 4] == 8 and ids.reshape(5, 5)[1, 1] == 0


def test_public_clips_are_quantiles_of_public_norms():
    spec = DpPadimSpec(epsilon=math.inf, dims=None, centre="none", mean_block=None, scale_block=None)
    public = torch.ones(3, 16, 6) * torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1)  # image means of norm k·sqrt(6)
    clips = public_clips(public, GRID, spec, quantile=0.5)
    assert clips.mean == pytest.approx(2.0 * math.sqrt(6))
    assert clips.second == pytest.approx(4.0 * 6)  # ||k² 11ᵀ||_F = k²·d


def test_private_model_still_detects_at_a_generous_epsilon():
    # 4 factories x 60 normal images (8 x 8 grid, 8 channels, a low-variance direction the
    # anomalies break); clips measured on an independent public draw, ε = 8
    grid = (8, 8)
    g = torch.Generator().manual_seed(0)
    mix = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    scale = torch.tensor([3.0, 2.0, 1.5, 1.0, 1.0, 0.5, 0.3, 0.2])

    def normal(n: int, seed: int) -> torch.Tensor:
        z = torch.randn(n, 64, 8, generator=torch.Generator().manual_seed(seed)) * scale
        return (z @ mix.T).float()

    spec = DpPadimSpec(epsilon=math.inf, dims=None, scale_block=4)
    spec = replace(spec, epsilon=8.0, clips=public_clips(normal(200, 99), grid, spec))
    model, releases = fit_federated([normal(60, k) for k in range(4)], grid, spec, noise_seed=1)
    test = normal(40, 50)
    labels = np.array([0] * 20 + [1] * 20)
    test[20:, 10] += 4.0 * mix[:, 7]  # one patch pushed along the least-varying direction
    scores, _ = model.score_embeddings(test, (32, 32))
    assert image_auroc(labels, scores.numpy()) >= 0.9
    assert all(r.ledger.epsilon(1e-5) <= 8.0 * (1 + 1e-6) for r in releases)
    assert isinstance(model, DpPadim) and model.count is None
