"""Patch features against hand-computed values and the official implementation's literal order."""

import torch
import torch.nn.functional as F

from patchcore.features import embed, patchify, pool_components, resize_grid


def test_patchify_hand_computed_3x3_with_zero_padding():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    patches, grid = patchify(x, 3)
    assert grid == (3, 3) and patches.shape == (1, 9, 1, 3, 3)
    # top-left patch: zero padding above and left
    assert patches[0, 0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert patches[0, 4, 0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # centre
    assert patches[0, 8, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]  # bottom-right


def test_pool_components_adaptive_average_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert pool_components(x, 3).tolist() == [[1.5, 3.5, 5.5]]
    # 6 -> 4: adaptive bins [0,2), [1,3), [3,5), [4,6)
    assert pool_components(x, 4).tolist() == [[1.5, 2.5, 4.5, 5.5]]
    # upsampling repeats (adaptive pooling to more bins than inputs)
    assert pool_components(torch.tensor([[1.0, 3.0]]), 4).tolist() == [[1.0, 1.0, 3.0, 3.0]]


def test_channel_major_flattening_makes_each_1024_bin_one_channel_patch_mean():
    # C*9 == 9*D: each output is the mean of one channel's 3x3 patch (the WRN layer3 case)
    x = torch.randn(1, 4, 5, 5)
    emb, grid = embed([x], patch_size=3, pretrain_dim=4, target_dim=4)
    expected = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)  # (1, 4, 5, 5)
    assert grid == (5, 5)
    assert torch.allclose(emb[0], expected[0].flatten(1).T, atol=1e-6)


def _official_embed(maps, patch_size, pre, target):
    """The official patchcore-inspection order: patchify, interpolate patches, pool per layer, aggregate."""
    feats = [patchify(m, patch_size) for m in maps]
    shapes, feats = [f[1] for f in feats], [f[0] for f in feats]
    ref = shapes[0]
    for i in range(1, len(feats)):
        f = feats[i]
        f = f.reshape(f.shape[0], *shapes[i], *f.shape[2:]).permute(0, 3, 4, 5, 1, 2)
        base = f.shape
        f = F.interpolate(f.reshape(-1, 1, *shapes[i]), size=ref, mode="bilinear", align_corners=False)
        f = f.reshape(*base[:-2], *ref).permute(0, 4, 5, 1, 2, 3)
        feats[i] = f.reshape(len(f), -1, *f.shape[-3:])
    feats = [x.reshape(-1, *x.shape[-3:]) for x in feats]
    feats = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pre).squeeze(1) for x in feats]
    x = torch.stack(feats, 1)
    return F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), target).reshape(len(x), -1)


def test_embed_equals_official_order_on_small_maps():
    torch.manual_seed(0)
    maps = [torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4)]
    ours, grid = embed(maps, 3, 16, 12)
    ref = _official_embed(maps, 3, 16, 12)
    assert grid == (8, 8) and ours.shape == (2, 64, 12)
    assert torch.allclose(ours.reshape(-1, 12), ref, atol=1e-6)


def test_resize_grid_identity_and_shape():
    x = torch.randn(2, 16, 5)
    assert resize_grid(x, (4, 4), (4, 4)) is x
    assert resize_grid(x, (4, 4), (8, 8)).shape == (2, 64, 5)


def test_convolution_route_equals_patch_route_for_lite_and_resnet_shapes():
    from patchcore.features import embed_by_convolution, embed_by_patches

    torch.manual_seed(0)
    cases = [([torch.randn(2, 40, 12, 12), torch.randn(2, 112, 6, 6)], 64, 48),  # Lite-like, upsampling pools
             # 3 layers, bins straddle layers
             ([torch.randn(1, 96, 8, 8), torch.randn(1, 160, 4, 4), torch.randn(1, 64, 2, 2)], 100, 70)]
    for maps, pre, target in cases:
        a, grid_a = embed_by_patches(maps, 3, pre, target)
        b, grid_b = embed_by_convolution(maps, 3, pre, target)
        assert grid_a == grid_b and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert not torch.equal(b, torch.zeros_like(b))


def test_wide_resnet_kernels_read_one_and_two_channels_with_the_hand_derived_weights():
    """WRN50-2 layer2 (512 ch) and layer3 (1024 ch), 1024 pretrain bins, 1024 outputs.
    Layer2: output i averages bins 2i = taps [0, 5) and 2i+1 = taps [4, 9) of channel i, so its
    3x3 kernel is (1,1,1,1,2,1,1,1,1)/10 on channel i alone. Layer3: bin b = channel b's 9 taps,
    output 512+i averages bins 2i and 2i+1: 1/18 on every tap of channels 2i and 2i+1."""
    from patchcore.features import _layer_kernels

    (w2, i2, a0, a1), (w3, i3, b0, b1) = _layer_kernels((512, 1024), 3, 1024, 1024)
    assert (a0, a1, b0, b1) == (0, 512, 512, 1024)
    assert w2.shape == (512, 1, 3, 3) and torch.equal(i2[:, 0], torch.arange(512))
    expected = torch.tensor([1, 1, 1, 1, 2, 1, 1, 1, 1], dtype=torch.float32).reshape(3, 3) / 10
    torch.testing.assert_close(w2[:, 0], expected.expand(512, 3, 3), rtol=0, atol=1e-7)
    assert w3.shape == (512, 2, 3, 3) and torch.equal(i3, torch.arange(1024).reshape(512, 2))
    torch.testing.assert_close(w3, torch.full((512, 2, 3, 3), 1 / 18), rtol=0, atol=1e-7)


def test_grouped_kernels_equal_the_patch_route_on_wide_resnet_shapes():
    from patchcore.features import embed_by_convolution, embed_by_patches

    torch.manual_seed(1)
    maps = [torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4)]
    a, grid_a = embed_by_patches(maps, 3, 1024, 1024)
    b, grid_b = embed_by_convolution(maps, 3, 1024, 1024)
    assert grid_a == grid_b == (8, 8) and a.shape == b.shape == (1, 64, 1024)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_dense_and_grouped_kernels_agree_whichever_the_threshold_picks(monkeypatch):
    import patchcore.features as features

    torch.manual_seed(3)
    maps = [torch.randn(2, 40, 12, 12), torch.randn(2, 112, 6, 6)]  # Lite-like: dense by default
    reference, _ = features.embed_by_patches(maps, 3, 1024, 1024)
    for threshold in (0, 128, 10**9):  # all grouped, the default choice, all dense
        monkeypatch.setattr(features, "GROUPED_MIN_SAVING", threshold)
        got, _ = features.embed_by_convolution(maps, 3, 1024, 1024)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
