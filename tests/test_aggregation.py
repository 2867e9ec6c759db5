"""Aggregation on hand-made point sets: budget split, the three methods, provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated.aggregation import aggregate, budget_shares
from federated.errors import PayloadError
from federated.payload import Payload, encode
from patchcore.errors import ConfigError


def payload(points, factory_id: int, num_patches: int, dtype: str = "float16") -> Payload:
    return encode(np.asarray(points, dtype=np.float32), num_patches=num_patches, num_images=1,
                  backbone_id="toy", factory_id=factory_id, dtype=dtype)


def blobs(n: int, factory_id: int, num_patches: int, dim: int = 4, seed: int = 0) -> Payload:
    rng = np.random.default_rng(seed + factory_id)
    return payload(rng.normal(size=(n, dim)) + 100 * factory_id, factory_id, num_patches)


def test_budget_split_two_way() -> None:
    res = aggregate([blobs(15, 0, 100), blobs(40, 1, 300)], method="random", global_ratio=0.1)
    assert res.budget == 40 and res.shares == [10, 30]


def test_budget_split_largest_remainder_three_way() -> None:
    # B = int(100 * 0.07) = 7; exact shares 3.15, 2.45, 1.40 -> floors 3, 2, 1 (sum 6); the one
    # unit left goes to the largest remainder (.45): 3, 3, 1 (plain rounding would give 3, 2, 1)
    ps = [blobs(10, 0, 45), blobs(10, 1, 35), blobs(10, 2, 20)]
    res = aggregate(ps, method="random", global_ratio=0.07)
    assert res.budget == 7 and res.shares == [3, 3, 1] and sum(res.shares) == 7
    assert res.kept_per_factory() == {0: 3, 1: 3, 2: 1}


def test_budget_shares_capped_and_redistributed() -> None:
    assert budget_shares(40, [100, 300], [50, 20]) == [20, 20]  # 30 capped to 20, 10 move over
    assert budget_shares(40, [100, 300], [5, 20]) == [5, 20]  # not enough vectors: all of them
    assert budget_shares(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]  # ties: earlier factory
    assert budget_shares(9, [10, 10, 80], [9, 1, 1]) == [7, 1, 1]


def test_concat_keeps_everything_in_factory_order() -> None:
    a, b = blobs(5, 2, 50), blobs(3, 7, 30)
    res = aggregate([b, a], method="concat", global_ratio=0.1)  # arrival order does not matter
    union = torch.cat([torch.from_numpy(a.features.astype(np.float32)),
                       torch.from_numpy(b.features.astype(np.float32))])
    assert res.bank.dtype == torch.float32 and torch.equal(res.bank, union)
    assert res.source.tolist() == [2] * 5 + [7] * 3
    assert res.factory_ids == [2, 7] and res.union_sizes == [5, 3] and res.union_size == 8
    assert res.budget == 8 and res.method == "concat"


def test_random_takes_exact_shares_from_each_client() -> None:
    a, b = blobs(30, 0, 100), blobs(60, 1, 300)
    res = aggregate([a, b], method="random", global_ratio=0.1, seed=3)
    assert res.shares == [10, 30] and len(res.bank) == 40
    assert res.kept_per_factory() == {0: 10, 1: 30}
    for fid, p in ((0, a), (1, b)):
        rows = res.bank[torch.from_numpy(res.source == fid)].numpy()
        sent = p.features.astype(np.float32)
        assert len({r.tobytes() for r in rows}) == len(rows)  # without replacement
        assert all((sent == r).all(axis=1).any() for r in rows)  # drawn from this client only
    again = aggregate([a, b], method="random", global_ratio=0.1, seed=3)
    other = aggregate([a, b], method="random", global_ratio=0.1, seed=4)
    assert torch.equal(again.bank, res.bank) and not torch.equal(other.bank, res.bank)


def test_coreset_of_coresets_exact_picks_by_hand() -> None:
    # union rows: 0 (0,0)  1 (1,0)  2 (10,0)  | 3 (2,0)  4 (11,0)  5 (0,30)
    a = payload([[0, 0], [1, 0], [10, 0]], factory_id=0, num_patches=20)
    b = payload([[2, 0], [11, 0], [0, 30]], factory_id=5, num_patches=20)
    # B = int(40 * 0.1) = 4. Exact greedy: first the row with the largest distance-matrix row
    # norm, (0,30) (all others are ~30 away from it); then the farthest from it, (11,0) (31.9 vs
    # 31.6 for (10,0)); then the farthest from both, (0,0) (11, vs 10 for (1,0), 9 for (2,0), 1
    # for (10,0)); then (2,0) (2, vs 1 for (1,0) and (10,0)).
    res = aggregate([b, a], method="coreset_of_coresets", global_ratio=0.1,
                    coreset_method="exact", projection_dim=None)
    assert res.budget == 4 and res.shares == [2, 2]
    expected = torch.tensor([[0.0, 30.0], [11.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    assert torch.equal(res.bank, expected)
    assert res.source.tolist() == [5, 5, 0, 5]
    assert res.kept_per_factory() == {0: 1, 5: 3}


def test_coreset_of_coresets_keeps_all_when_union_fits_budget() -> None:
    a, b = blobs(3, 0, 100), blobs(4, 1, 100)  # B = 20 > |U| = 7
    res = aggregate([a, b], global_ratio=0.1)
    assert res.budget == 20 and len(res.bank) == 7 and res.shares == [3, 4]
    assert res.source.tolist() == [0] * 3 + [1] * 4


def test_coreset_of_coresets_covers_every_cluster_approximate() -> None:
    # 8 far-apart clusters in 200-D (so the random projection is used), split over 2 clients;
    # a budget of 8 must put one bank vector in each cluster.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 200)) * 50
    pts = np.concatenate([c + rng.normal(size=(10, 200)) for c in centres])  # (80, 200)
    a = payload(pts[::2], factory_id=0, num_patches=400)
    b = payload(pts[1::2], factory_id=1, num_patches=400)
    res = aggregate([a, b], global_ratio=0.01, seed=1)
    assert res.budget == 8 and res.bank.shape == (8, 200)
    nearest = torch.cdist(res.bank.double(), torch.from_numpy(centres)).argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(8))
    union = torch.cat([torch.from_numpy(p.features.astype(np.float32)) for p in (a, b)])
    rows = [int((union == r).all(dim=1).nonzero()[0]) for r in res.bank]
    assert res.source.tolist() == [0 if i < 40 else 1 for i in rows]  # provenance matches


def test_errors() -> None:
    with pytest.raises(ConfigError, match="coreset_of_coresets, concat, random"):
        aggregate([blobs(3, 0, 10)], method="mean")
    with pytest.raises(PayloadError, match="no payloads"):
        aggregate([])
    with pytest.raises(PayloadError, match=r"inconsistent feature dimensions \(factory-0: 4, "
                                           r"factory-1: 3\)"):
        aggregate([blobs(3, 0, 10), blobs(3, 1, 10, dim=3)])
    with pytest.raises(PayloadError, match="several payloads from one factory"):
        aggregate([blobs(3, 0, 10), blobs(3, 0, 10)])
    with pytest.raises(ConfigError, match="ratio"):
        aggregate([blobs(3, 0, 10)], global_ratio=0.0)
