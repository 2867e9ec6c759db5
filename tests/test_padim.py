"""PaDiM (patchcore/padim.py) and its exact federated form (federated/padim.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated.errors import PayloadError
from federated.padim import aggregate, decode_stats, encode_stats, site_stats, upload_bytes
from patchcore.config import BackboneConfig, ModelConfig
from patchcore.errors import BankFormatError, ConfigError, DataError
from patchcore.padim import Padim, PadimStats, mahalanobis, select_dims
from tests.conftest import SHARED_MVTEC


def _emb(n: int, positions: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, positions, dim, generator=g) * 2.0 + 3.0  # (N, L, d), non-zero mean


def test_gaussian_matches_numpy_cov_and_mahalanobis_matches_direct_formula():
    emb = _emb(7, 4, 3)  # (N, L, d)
    gauss = PadimStats.from_embeddings(emb).gaussian(eps=0.01)
    x = emb.double().numpy()
    for pos in range(4):
        np.testing.assert_allclose(gauss.mean[pos].numpy(), x[:, pos].mean(axis=0), rtol=0, atol=1e-12)
        expected = np.cov(x[:, pos], rowvar=False) + 0.01 * np.eye(3)  # the official PaDiM code
        np.testing.assert_allclose(gauss.cov[pos].numpy(), expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(gauss.precision[pos].numpy(), np.linalg.inv(expected), rtol=1e-10)
    query = _emb(5, 4, 3, seed=1)
    dist = mahalanobis(gauss, query).numpy()  # (5, L)
    for pos in range(4):
        inv = np.linalg.inv(np.cov(x[:, pos], rowvar=False) + 0.01 * np.eye(3))
        for i in range(5):
            diff = query[i, pos].double().numpy() - x[:, pos].mean(axis=0)
            assert dist[i, pos] == pytest.approx(np.sqrt(diff @ inv @ diff), rel=1e-10)


def test_stats_chunking_does_not_change_the_sums(monkeypatch):
    emb = _emb(9, 5, 4)
    whole = PadimStats.from_embeddings(emb)
    monkeypatch.setattr("patchcore.padim.CHUNK_BYTES", 1)  # one image per chunk
    chunked = PadimStats.from_embeddings(emb)
    assert chunked.count == 9
    torch.testing.assert_close(chunked.outer, whole.outer, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(chunked.sums, whole.sums, rtol=1e-13, atol=1e-12)


def test_outlier_scores_higher_and_image_score_is_the_max_patch():
    grid = (4, 4)
    train = _emb(40, 16, 8)
    model = Padim(ModelConfig(), dims=None).fit_embeddings(train, grid)
    test = _emb(3, 16, 8, seed=5)
    test[1, 6] += 15.0  # one anomalous patch in image 1
    patch = model.patch_scores(test)  # (3, 4, 4)
    assert patch.shape == (3, 4, 4)
    assert patch[1, 1, 2] > 2 * patch[[0, 2]].max()  # position 6 = row 1, col 2
    scores, maps = model.score_embeddings(test, (32, 32))
    assert maps.shape == (3, 32, 32)
    torch.testing.assert_close(scores, patch.flatten(1).max(dim=1).values)
    assert int(scores.argmax()) == 1
    assert int(maps[1].argmax()) // 32 in range(4, 16)  # the peak lies over the anomalous patch row


def test_select_dims_is_deterministic_sorted_and_keeps_all_when_asked():
    a, b = select_dims(152, 100, seed=3), select_dims(152, 100, seed=3)
    assert torch.equal(a, b) and len(a) == 100 and len(set(a.tolist())) == 100
    assert torch.equal(a, a.sort().values) and int(a.max()) < 152
    assert not torch.equal(a, select_dims(152, 100, seed=4))
    assert torch.equal(select_dims(152, None), torch.arange(152))
    assert torch.equal(select_dims(50, 100), torch.arange(50))
    with pytest.raises(ConfigError, match="dims"):
        select_dims(50, 0)


def test_stats_of_different_shapes_do_not_merge_and_one_image_has_no_covariance():
    a, b = PadimStats.from_embeddings(_emb(3, 4, 3)), PadimStats.from_embeddings(_emb(3, 4, 5))
    with pytest.raises(ConfigError, match=r"\(4, 3\) vs \(4, 5\)"):
        _ = a + b
    with pytest.raises(DataError, match="at least 2"):
        PadimStats.from_embeddings(_emb(1, 4, 3)).gaussian()


def _assert_federated_equals_centralized(emb: torch.Tensor, sizes: list[int], tol: float) -> None:
    central = PadimStats.from_embeddings(emb).gaussian()
    sites = torch.split(emb, sizes)
    blobs = [encode_stats(PadimStats.from_embeddings(s)) for s in sites]
    positions, dim = emb.shape[1:]
    fed = aggregate(decode_stats(b, expect_L=positions, expect_d=dim) for b in blobs).gaussian()
    assert fed.count == central.count == len(emb)
    assert float((fed.mean - central.mean).abs().max()) <= tol
    assert float((fed.cov - central.cov).abs().max()) <= tol
    query = emb[:3]
    dist_fed, dist_central = mahalanobis(fed, query), mahalanobis(central, query)
    assert float(((dist_fed - dist_central).abs() / dist_central).max()) <= tol


def test_federated_equals_centralized_over_three_unequal_sites():
    _assert_federated_equals_centralized(_emb(23, 12, 10), [3, 7, 13], tol=1e-10)


def test_upload_bytes_counts_the_upper_triangle_only():
    stats = PadimStats.from_embeddings(_emb(2, 6, 5))
    blob = encode_stats(stats)
    assert upload_bytes(6, 5) == 8 * 6 * 5 + 8 * 6 * 15
    assert upload_bytes(6, 5) <= len(blob) <= upload_bytes(6, 5) + 1024
    assert upload_bytes(784, 100) == 32_300_800  # < the 63.3 MB of full (L, d, d) matrices


@pytest.fixture
def blob() -> bytes:
    return encode_stats(PadimStats.from_embeddings(_emb(4, 6, 5)))


def _rewrite(blob: bytes, **changes) -> bytes:
    """The same statistics with some arrays or metadata replaced."""
    from safetensors.torch import load, save

    arrays = load(blob)
    meta = {"format": "fedpatch-padim-stats", "format_version": "1", "count": "4", "positions": "6", "dim": "5"}
    meta.update({k: v for k, v in changes.items() if isinstance(v, str)})
    arrays.update({k: v for k, v in changes.items() if isinstance(v, torch.Tensor)})
    return save(arrays, metadata=meta)


def test_decode_rejects_truncated_wrong_shaped_and_non_finite_stats(blob):
    assert decode_stats(_rewrite(blob)).count == 4  # the rewrite itself is valid
    with pytest.raises(PayloadError, match="truncated"):
        decode_stats(blob[: len(blob) // 2])
    with pytest.raises(PayloadError, match="truncated"):
        decode_stats(blob[:5])
    with pytest.raises(PayloadError, match=r"'sums' must be \(6, 5\) float64, got \(6, 4\)"):
        decode_stats(_rewrite(blob, sums=torch.zeros(6, 4, dtype=torch.float64)))
    with pytest.raises(PayloadError, match="'sums' must be .* float64, got .*float32"):
        decode_stats(_rewrite(blob, sums=torch.zeros(6, 5)))
    bad = load_sums(blob)
    bad[2, 3] = float("nan")
    with pytest.raises(PayloadError, match="non-finite.*1 of 30"):
        decode_stats(_rewrite(blob, sums=bad))
    with pytest.raises(PayloadError, match="positions L = 6, expected 784"):
        decode_stats(blob, expect_L=784)
    with pytest.raises(PayloadError, match="dims d = 5, expected 100"):
        decode_stats(blob, expect_d=100)
    with pytest.raises(PayloadError, match="'count' must be >= 1, got 0"):
        decode_stats(_rewrite(blob, count="0"))
    with pytest.raises(PayloadError, match="violate"):  # a count inflated 1000x is not data
        decode_stats(_rewrite(blob, sums=load_sums(blob) * 1000))
    with pytest.raises(PayloadError, match="format version"):
        decode_stats(_rewrite(blob, format_version="2"))


def load_sums(blob: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(blob)["sums"].clone()


def test_model_round_trips_through_safetensors_and_refuses_edits(tmp_path):
    train, grid = _emb(6, 9, 12), (3, 3)
    model = Padim(ModelConfig(smoothing_sigma=2.0), dims=5, seed=7).fit_embeddings(train, grid)
    tensor_path, meta_path = model.save(tmp_path / "padim")
    loaded = Padim.load(tmp_path / "padim")
    assert loaded.config.smoothing_sigma == 2.0 and loaded.grid == grid and torch.equal(loaded.indices, model.indices)
    query = _emb(2, 9, 12, seed=2)
    torch.testing.assert_close(loaded.score_embeddings(query, (12, 12)), model.score_embeddings(query, (12, 12)))
    data = bytearray(tensor_path.read_bytes())
    data[-1] ^= 1
    tensor_path.write_bytes(bytes(data))
    with pytest.raises(BankFormatError, match="sha256"):
        Padim.load(tmp_path / "padim")


@pytest.fixture(scope="module")
def tire_embeddings() -> tuple[torch.Tensor, tuple[int, int]]:
    """12 tire training images through EfficientNet-Lite0 (ImageNet), layer2+layer3, 256/224."""
    root = SHARED_MVTEC / "tire" / "train" / "good"
    if not root.is_dir():
        pytest.skip(f"real tire images not found at {root}")
    from PIL import Image

    from patchcore.data.transforms import Preprocess
    from patchcore.model import PatchCore

    paths = sorted(root.glob("*.png"))[:12]
    pre = Preprocess(resize=256, crop=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # backbone normalises
    images = torch.stack([pre.image(Image.open(p)) for p in paths])
    config = ModelConfig(backbone=BackboneConfig("efficientnet_lite0", ("layer2", "layer3"), "imagenet"))
    return PatchCore(config, device="cpu").embed(images)


def test_real_tire_features_federated_gaussian_equals_centralized(tire_embeddings):
    emb, grid = tire_embeddings  # (12, 784, 152)
    assert emb.shape[:2] == (12, grid[0] * grid[1]) == (12, 784)
    indices = select_dims(emb.shape[-1], 100, seed=0)
    central = Padim(dims=100, seed=0).fit_embeddings(emb, grid)
    assert torch.equal(central.indices, indices)
    blobs = [encode_stats(site_stats(part, indices)) for part in torch.split(emb, [2, 4, 6])]
    assert all(len(b) - upload_bytes(784, 100) < 1024 for b in blobs)
    federated = Padim(dims=100, seed=0, indices=indices).set_stats(
        aggregate(decode_stats(b, expect_L=784, expect_d=100) for b in blobs), grid)
    fed, cen = federated.gaussian, central.gaussian
    assert float((fed.mean - cen.mean).abs().max()) <= 1e-6
    assert float((fed.cov - cen.cov).abs().max()) <= 1e-6
    patch_fed, patch_cen = federated.patch_scores(emb), central.patch_scores(emb)
    assert float((patch_fed - patch_cen).abs().max()) <= 1e-6 * float(patch_cen.abs().max())
    # a training point's Mahalanobis distance to its own sample Gaussian is at most (N-1)/sqrt(N)
    # (eps·I only shrinks it): a bound any error in mean, covariance or precision would break
    assert float(patch_cen.max()) <= 11 / np.sqrt(12)
