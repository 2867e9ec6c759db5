"""Partition invariants for every scheme, skew/size properties, and the error messages."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from federated.errors import PartitionError
from federated.partition import SCHEMES, FactoryShard, apportion, partition
from patchcore.data.records import ImageRecord
from patchcore.errors import ConfigError


def make_records(categories=("bottle", "cable", "screw", "wood"), n_train=24, n_val=4,
                 n_test=12) -> list[ImageRecord]:
    records = []
    for cat in categories:
        for i in range(n_train):
            records.append(ImageRecord(Path(f"/d/{cat}/train/good/{i:03d}.png"), cat, 0, "good",
                                       "train"))
        for i in range(n_val):
            records.append(ImageRecord(Path(f"/d/{cat}/val/good/{i:03d}.png"), cat, 0, "good",
                                       "validation"))
        for i in range(n_test):
            label = i % 2
            defect = "crack" if label else "good"
            records.append(ImageRecord(Path(f"/d/{cat}/test/{defect}/{i:03d}.png"), cat, label,
                                       defect, "test"))
    return records


def key(r: ImageRecord) -> tuple:
    return (str(r.path), r.split)


def assignment(shards: list[FactoryShard]) -> dict[tuple, int]:
    return {key(r): s.factory_id for s in shards for r in s.train + s.validation + s.test}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_factories", [3, 6])
def test_invariants(scheme: str, num_factories: int) -> None:
    records = make_records()
    shards = partition(records, num_factories, scheme, seed=7, alpha=2.0)
    assert [s.factory_id for s in shards] == list(range(num_factories))
    # disjoint and complete: every input record in exactly one shard, in the right split
    seen = [(key(r), r.split) for s in shards for r in s.train + s.validation + s.test]
    assert len(seen) == len(set(seen)) == len(records)
    assert {k for k, _ in seen} == {key(r) for r in records}
    for s in shards:
        assert s.name == f"factory-{s.factory_id}"
        assert all(r.split == "train" for r in s.train)
        assert all(r.split == "validation" for r in s.validation)
        assert all(r.split == "test" for r in s.test)
        assert all(r.domain == s.name for r in s.train + s.validation + s.test)
        trained = set(s.categories())
        # a factory is only tested (and validated) on the products it trains on
        assert {r.category for r in s.test + s.validation} <= trained
    # same seed -> same shards; different seed -> different shards
    assert assignment(partition(records, num_factories, scheme, seed=7, alpha=2.0)) == \
        assignment(shards)
    assert assignment(partition(records, num_factories, scheme, seed=8, alpha=2.0)) != \
        assignment(shards)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_test_images_follow_training_images(scheme: str) -> None:
    # few training but many test images: test counts must track each factory's training
    # counts per category, not the scheme's weights (else untrained factories get tests)
    records = make_records(n_train=2, n_val=6, n_test=12)
    for s in partition(records, 4, scheme, seed=2, min_train=0):
        for cat in ("bottle", "cable", "screw", "wood"):
            n_train = sum(r.category == cat for r in s.train)
            assert sum(r.category == cat for r in s.test) == 6 * n_train
            assert sum(r.category == cat for r in s.validation) == 3 * n_train


def test_order_of_input_does_not_matter() -> None:
    records = make_records()
    a = partition(records, 4, "dirichlet", seed=3)
    b = partition(list(reversed(records)), 4, "dirichlet", seed=3)
    assert assignment(a) == assignment(b)


def test_iid_every_factory_gets_every_category_evenly() -> None:
    shards = partition(make_records(), 4, "iid", seed=0)
    for s in shards:
        per_cat = Counter(r.category for r in s.train)
        assert per_cat == {"bottle": 6, "cable": 6, "screw": 6, "wood": 6}
        assert Counter(r.category for r in s.test) == {c: 3 for c in per_cat}


def test_iid_remainders_are_spread_over_factories() -> None:
    # 4 categories x 5 images over 4 factories: each category leaves one extra image
    shards = partition(make_records(n_train=5, n_val=0, n_test=0), 4, "iid", seed=1)
    assert sorted(len(s.train) for s in shards) != [4, 4, 4, 8]
    assert sum(len(s.train) for s in shards) == 20


def test_category_more_categories_than_factories() -> None:
    shards = partition(make_records(), 2, "category", seed=0)
    cats = [set(s.categories()) for s in shards]
    assert [len(c) for c in cats] == [2, 2] and not cats[0] & cats[1]
    for s in shards:  # all of a category's images go to its one factory
        assert len(s.train) == 48 and len(s.test) == 24


def test_category_more_factories_than_categories_shares_a_category() -> None:
    shards = partition(make_records(categories=("a", "b")), 5, "category", seed=0)
    cats = [s.categories() for s in shards]
    assert all(len(c) == 1 for c in cats)
    owners = Counter(c[0] for c in cats)
    assert sorted(owners.values()) == [2, 3]
    for s in shards:  # a shared category is split evenly among its factories
        share = 24 // owners[s.categories()[0]]
        assert share <= len(s.train) <= share + 1


def test_dirichlet_small_alpha_is_skewed() -> None:
    cats = tuple(f"c{i}" for i in range(8))
    records = make_records(categories=cats, n_train=100, n_val=0, n_test=10)

    def top_share(alpha: float) -> float:
        shards = partition(records, 4, "dirichlet", seed=0, alpha=alpha, min_train=0)
        shares = []
        for cat in cats:
            counts = [sum(r.category == cat for r in s.train) for s in shards]
            shares.append(max(counts) / sum(counts))
        return float(np.mean(shares))

    assert top_share(0.05) > 0.7  # one factory makes most of each product (uniform: 0.25)
    assert top_share(100.0) < 0.35  # near-uniform: 0.25 each


def test_quantity_sizes_are_monotone_power_law() -> None:
    shards = partition(make_records(n_train=100), 4, "quantity", seed=0, quantity_exponent=1.5)
    sizes = [len(s.train) for s in shards]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1]
    expected = 400 * (np.arange(1, 5) ** -1.5) / (np.arange(1, 5) ** -1.5).sum()
    assert np.allclose(sizes, expected, atol=4)
    for s in shards:  # same category mix everywhere
        assert set(s.categories()) == {"bottle", "cable", "screw", "wood"}


def test_min_train_error_names_factory_scheme_and_fix() -> None:
    records = make_records(categories=("a",), n_train=3, n_val=0, n_test=2)
    with pytest.raises(PartitionError) as err:
        partition(records, 5, "iid", seed=0)
    msg = str(err.value)
    assert "factory-" in msg and "'iid'" in msg and "fewer factories" in msg
    assert "min_train=1" in msg
    with pytest.raises(PartitionError, match=r"dirichlet.*larger alpha \(now 0.01\)"):
        partition(make_records(), 8, "dirichlet", seed=0, alpha=0.01, min_train=20)


def test_min_train_error_stays_one_short_line_for_many_factories() -> None:
    records = make_records(categories=("a",), n_train=3, n_val=0, n_test=2)
    with pytest.raises(PartitionError) as err:
        partition(records, 500, "iid", seed=0)  # 497 factories without a training image
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert msg.count("factory-") == 5 and "and 492 more" in msg


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="iid, category, dirichlet, quantity"):
        partition(make_records(), 2, "shards", seed=0)


def test_apportion_largest_remainder() -> None:
    assert apportion(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert apportion(10, [1, 1, 1], order=[2, 0, 1]).tolist() == [3, 3, 4]
    assert apportion(7, [0, 1, 1]).tolist() == [0, 4, 3]
    assert apportion(5, [0.5, 0.3, 0.2]).tolist() == [3, 1, 1]
