"""Greedy k-center coreset: hand-made picks, the official reference loop, determinism."""

import pytest
import torch

from patchcore.coreset import coreset_size, coverage_radius, greedy_coreset, project, random_projection
from patchcore.errors import ConfigError


def _reference_loop(x: torch.Tensor, size: int, init: torch.Tensor) -> list[int]:
    """The official loop, literally: cdist to the new pick, min with the running distances."""
    d = init.clone()
    picks = []
    for _ in range(size):
        i = int(torch.argmax(d))
        picks.append(i)
        d = torch.minimum(d, torch.cdist(x, x[i : i + 1]).squeeze(1))
    return picks


def test_exact_greedy_picks_true_farthest_points_on_hand_made_set():
    # a tight cluster at the origin and three far outliers at known distances
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 0.0], [0.0, 6.0], [-3.0, 0.0]])
    picks = greedy_coreset(pts, 4, method="exact", projection_dim=None).tolist()
    # first pick: largest distance-matrix row norm -> (10, 0); then the farthest from it:
    # (-3, 0) at 13 beats (0, 6) at sqrt(136) = 11.7; then (0, 6), whose distance to the picks is
    # min(11.7, sqrt(45) = 6.7) against the origin cluster's 3; then a point of the origin cluster
    assert picks[:3] == [3, 5, 4]
    assert picks[3] in (0, 1, 2)


def test_exact_mode_identical_to_reference_loop_with_row_norm_start():
    torch.manual_seed(3)
    x = torch.randn(400, 16, dtype=torch.float64).float()
    full = torch.cdist(x.double(), x.double())
    init = full.norm(dim=1).float()
    ours = greedy_coreset(x, 40, method="exact", projection_dim=None).tolist()
    assert ours == _reference_loop(x, 40, init)


def test_approximate_mode_identical_to_reference_loop_with_mean_start():
    torch.manual_seed(4)
    x = torch.randn(500, 300)
    seed = 7
    xp = x @ random_projection(300, 128, seed).T  # the projection the sampler uses
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randperm(500, generator=gen)[:10]
    init = torch.cdist(xp, xp[starts]).mean(dim=1)
    ours = greedy_coreset(x, 50, method="approximate", seed=seed).tolist()
    assert ours == _reference_loop(xp, 50, init)


def test_projection_is_linear_init_distribution_and_seeded():
    w = random_projection(1024, 128, seed=1)
    assert w.shape == (128, 1024) and w.abs().max() <= 1 / 32
    assert torch.equal(w, random_projection(1024, 128, seed=1))
    assert not torch.equal(w, random_projection(1024, 128, seed=2))
    assert project(torch.ones(3, 64), 128, 0).shape == (3, 64)  # never projects upward


def test_seeded_determinism_and_unique_picks():
    x = torch.randn(2000, 64)
    a = greedy_coreset(x, 200, seed=0)
    assert torch.equal(a, greedy_coreset(x, 200, seed=0))
    assert len(set(a.tolist())) == 200
    assert not torch.equal(a, greedy_coreset(x, 200, seed=1))


def test_greedy_covers_better_than_random():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1500, 8), torch.randn(20, 8) + 12])  # a rare far cluster
    greedy = x[greedy_coreset(x, 60, projection_dim=None)]
    rand = x[torch.randperm(len(x))[:60]]
    assert coverage_radius(greedy, x) < coverage_radius(rand, x)


def test_coverage_radius_hand_computed():
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    feats = torch.tensor([[1.0, 0.0], [7.0, 0.0], [0.0, 3.0]])
    assert coverage_radius(bank, feats) == pytest.approx(3.0)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, "x"])
def test_ratio_outside_unit_interval_is_config_error(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        coreset_size(100, ratio)


def test_coreset_size_rounds_down_like_upstream_but_keeps_one():
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(1005, 0.1) == 100
    assert coreset_size(5, 0.1) == 1
    assert coreset_size(10, 1.0) == 10


def test_unknown_method_is_config_error():
    with pytest.raises(ConfigError, match="unknown coreset method"):
        greedy_coreset(torch.randn(10, 2), 3, method="fast")


def test_bfloat16_storage_picks_like_float32_when_rounding_is_exact():
    # small integers with zero column means: bf16 holds them, their products and the centring exactly,
    # so the bf16 path (centring, storage, fp32 norms, the update) must reproduce the fp32 picks
    torch.manual_seed(5)
    half = torch.randint(-3, 4, (150, 6)).float()
    x = torch.cat([half, -half])
    for method in ("exact", "approximate"):
        ref = greedy_coreset(x, 30, method=method, projection_dim=None)
        bf16 = greedy_coreset(x, 30, method=method, projection_dim=None, precision="bfloat16")
        assert bf16.tolist() == ref.tolist()


def test_bfloat16_storage_covers_like_float32_on_real_valued_features():
    torch.manual_seed(6)
    centres = torch.randn(12, 256) * 4 + 30  # far from the origin: centring matters
    x = (centres[torch.randint(0, 12, (3000,))] + torch.randn(3000, 256))
    fp32 = coverage_radius(x[greedy_coreset(x, 150)], x)
    bf16_picks = greedy_coreset(x, 150, precision="bfloat16")
    assert len(set(bf16_picks.tolist())) == 150 and bf16_picks.dtype == torch.long
    assert coverage_radius(x[bf16_picks], x) <= 1.05 * fp32
    assert torch.equal(bf16_picks, greedy_coreset(x, 150, precision="bfloat16"))


def test_unknown_precision_is_config_error():
    with pytest.raises(ConfigError, match="precision"):
        greedy_coreset(torch.randn(10, 2), 3, precision="float16")


def test_config_precision_is_validated():
    from patchcore.config import Config, CoresetConfig, DataConfig, ModelConfig

    ok = Config(data=DataConfig(format="synthetic"), model=ModelConfig(coreset=CoresetConfig(precision="bfloat16")))
    ok.validate()
    with pytest.raises(ConfigError, match="model.coreset.precision"):  # a config is checked as it is built
        Config(data=DataConfig(format="synthetic"), model=ModelConfig(coreset=CoresetConfig(precision="half")))


def test_approximate_mode_identical_to_reference_loop_over_many_argmax_blocks():
    """N = 3000 spans three 1024-value blocks of the two-stage argmax, the last one padded."""
    torch.manual_seed(11)
    x = torch.randn(3000, 200)
    xp = x @ random_projection(200, 128, 0).T
    starts = torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:10]
    init = torch.cdist(xp, xp[starts]).mean(dim=1)
    ours = greedy_coreset(x, 120, method="approximate", seed=0).tolist()
    assert ours == _reference_loop(xp, 120, init)


def test_two_stage_argmax_is_torch_argmax_including_ties():
    from patchcore.coreset import _Argmax

    gen = torch.Generator().manual_seed(5)
    for n in (1, 7, 1024, 1025, 5000):
        v = torch.randint(0, 6, (n,), generator=gen).float()  # many ties: the first index must win
        arg = _Argmax(v, block=64)
        out = torch.empty(1, dtype=torch.long)
        for _ in range(5):
            assert int(arg(out)) == int(torch.argmax(v)) and int(out) == int(torch.argmax(v))
            arg.values[int(out)] = -1.0  # lower the current max, as a pick does
            v[int(out)] = -1.0
        assert torch.equal(arg.values, v) and arg.buffer[n:].eq(float("-inf")).all()


def test_projection_in_row_blocks_equals_one_product_and_accepts_half_precision():
    torch.manual_seed(6)
    x = torch.randn(1000, 300)
    whole = x @ random_projection(300, 128, 3).T
    blocks = project(x, 128, 3, chunk_bytes=4 * 300 * 77)  # 77 rows a block, a ragged last block
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-5)
    half = project(x.half(), 128, 3, chunk_bytes=4 * 300 * 100)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, x.half().float() @ random_projection(300, 128, 3).T, rtol=1e-5, atol=1e-5)


def _clustered(seed: int, n: int = 3000, dim: int = 48, clusters: int = 12) -> torch.Tensor:
    """Gaussian blobs of different spreads, with a block of exact duplicates (argmax ties)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen) * 6
    which = torch.randint(0, clusters, (n,), generator=gen)
    spread = torch.rand(clusters, generator=gen)[which].unsqueeze(1) + 0.2
    x = centres[which] + spread * torch.randn(n, dim, generator=gen)
    x[100:160] = x[7]  # 61 identical points
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method,projection_dim", [("approximate", None), ("approximate", 32), ("exact", None)])
def test_pruned_loop_picks_exactly_the_plain_loops_points(seed, method, projection_dim):
    x = _clustered(seed)
    stats: dict = {}
    kwargs = dict(method=method, projection_dim=projection_dim, seed=seed)
    pruned = greedy_coreset(x, 600, pruning="on", stats=stats, **kwargs)
    plain = greedy_coreset(x, 600, pruning="off", **kwargs)
    assert stats["loop"] == "pruned"
    assert torch.equal(pruned, plain)
    # and it really prunes: after the first picks most points are never touched
    assert stats["updated"] < 0.35 * 600 * len(x), stats


def test_pruned_loop_breaks_ties_like_the_plain_loop():
    # a lattice: many points at exactly the same distance from the picks (ties at every step)
    g = torch.arange(12, dtype=torch.float32)
    x = torch.cartesian_prod(g, g, g, g, g)[:5000]  # (5000, 5) integer points, exact arithmetic
    x = torch.cat([x, torch.zeros(len(x), 15)], dim=1)  # 20 dims: more than the bound's basis
    pruned = greedy_coreset(x, 400, projection_dim=None, pruning="on")
    assert torch.equal(pruned, greedy_coreset(x, 400, projection_dim=None, pruning="off"))


def test_pruning_auto_is_the_plain_loop_where_it_cannot_help():
    x = _clustered(0, n=500)
    for kwargs in ({"precision": "bfloat16"}, {"projection_dim": 16}):  # bf16 storage; P <= basis
        stats: dict = {}
        greedy_coreset(x, 50, stats=stats, **kwargs)
        assert stats["loop"] == "plain"
    stats = {}
    greedy_coreset(x, 50, stats=stats)
    assert stats["loop"] == "pruned"  # CPU, float32, 128 > 16 dims
    with pytest.raises(ConfigError, match="unknown coreset pruning 'fast'"):
        greedy_coreset(x, 5, pruning="fast")


def test_config_pruning_is_validated():
    from patchcore.config import Config, CoresetConfig, DataConfig, ModelConfig

    Config(data=DataConfig(format="synthetic"), model=ModelConfig(coreset=CoresetConfig(pruning="off"))).validate()
    with pytest.raises(ConfigError, match="model.coreset.pruning"):  # a config is checked as it is built
        Config(data=DataConfig(format="synthetic"), model=ModelConfig(coreset=CoresetConfig(pruning="sometimes")))


@pytest.mark.slow
def test_pruned_loop_equals_plain_loop_on_real_tire_embeddings(shared_mvtec):
    from patchcore.config import BackboneConfig, DataConfig, ModelConfig
    from patchcore.data import ImageDataset, make_loader
    from patchcore.data.sources import load_records, model_preprocess
    from patchcore.model import PatchCore

    data = DataConfig(format="mvtec", root=str(shared_mvtec), batch_size=8)
    records = [r for r in load_records(data, shared_mvtec, "tire") if r.split == "train"][:24]
    backbone = BackboneConfig("efficientnet_lite0", ("layer2", "layer3"), "imagenet")
    model = PatchCore(ModelConfig(backbone=backbone, layer_weighting="paper"), "cpu")  # 1024-d, as WRN
    feats = model.extract(make_loader(ImageDataset(records, model_preprocess(data)), 8), progress=False)
    assert feats.shape == (24 * 28 * 28, 1024)
    for dim in (128, None):  # the paper's projection, and the unprojected 1024-d loop
        stats: dict = {}
        pruned = greedy_coreset(feats, 1800, projection_dim=dim, pruning="on", stats=stats)
        assert torch.equal(pruned, greedy_coreset(feats, 1800, projection_dim=dim, pruning="off"))
        assert stats["updated"] < 0.5 * 1800 * len(feats), stats
