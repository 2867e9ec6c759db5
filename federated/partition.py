"""Split a dataset's records into factory shards.

A shard is what one simulated factory owns: its training images (the good parts it built), the
validation images it may calibrate a threshold on, and the test images it is judged on. The
schemes model how real factories differ:

- `iid`: every factory builds every product, in equal amounts.
- `category`: each factory builds its own products (categories assigned to factories).
- `dirichlet`: each product's output is spread over factories by Dir(alpha) proportions; small
  alpha means a few factories build most of a product (label skew in federated-learning terms).
- `quantity`: same product mix everywhere, but shard sizes follow a power law.

Whatever the scheme, a factory is tested on the products it makes: a category's test (and
validation) images go to factories in the proportions of that category's training images, so a
factory with no training image of a category receives no test image of it. Every record lands in
exactly one shard and carries the shard's name as its `domain`, which selects the factory's
domain shift downstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from federated.errors import PartitionError
from patchcore.data.records import ImageRecord
from patchcore.errors import ConfigError

SCHEMES: tuple[str, ...] = ("iid", "category", "dirichlet", "quantity")
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def factory_name(factory_id: int) -> str:
    """The one spelling of a factory's name: shard name, record domain, shift key, client name."""
    return f"factory-{factory_id}"


@dataclass
class FactoryShard:
    """The records one factory owns; all carry `domain == self.name`."""

    factory_id: int
    train: list[ImageRecord]
    test: list[ImageRecord]
    validation: list[ImageRecord] = field(default_factory=list)
    site_name: str | None = None  # a deployed site's own name; simulated shards are factory-K

    @property
    def name(self) -> str:
        return self.site_name or factory_name(self.factory_id)

    def categories(self) -> list[str]:
        """Categories this factory trains on, sorted."""
        return sorted({r.category for r in self.train})


def apportion(total: int, weights: Sequence[float] | np.ndarray,
              order: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Integer counts summing exactly to `total`, proportional to `weights` (largest remainder).

    Each entry gets the floor of its exact share; the units left over go to the largest
    fractional parts. Ties are broken by `order` (a permutation of entry indices, earlier wins;
    default: lower index first), so the result is deterministic. An entry of weight 0 never gets
    a unit. Returns int64 counts of shape (len(weights),).
    """
    w = np.asarray(weights, dtype=np.float64)  # (K,)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"apportion: weights must be a non-empty 1-D array >= 0, got {w}")
    if total < 0:
        raise ValueError(f"apportion: total must be >= 0, got {total}")
    if w.sum() == 0:
        if total == 0:
            return np.zeros(len(w), dtype=np.int64)
        raise ValueError("apportion: cannot share a positive total among zero weights")
    exact = total * w / w.sum()  # (K,)
    counts = np.floor(exact).astype(np.int64)
    frac = np.where(w > 0, exact - counts, -1.0)  # zero weights last, always
    rank = np.arange(len(w)) if order is None else np.argsort(np.asarray(order))
    left = int(total - counts.sum())
    winners = np.lexsort((rank, -frac))[:left]
    counts[winners] += 1
    return counts


def partition(records: Iterable[ImageRecord], num_factories: int, scheme: str, seed: int,
              alpha: float = 0.5, quantity_exponent: float = 1.5,
              min_train: int = 1) -> list[FactoryShard]:
    """Split `records` into `num_factories` disjoint, complete shards (see module docstring).

    Deterministic for a seed: records are first sorted by path, then shuffled with a numpy
    Generator seeded by `seed`, so the loader's listing order does not matter.
    """
    _check_arguments(num_factories, scheme, alpha, quantity_exponent, min_train)
    by_category = _group(records)
    rng = np.random.default_rng(seed)
    categories = sorted(by_category)
    weights = _scheme_weights(scheme, len(categories), num_factories, rng,
                              alpha, quantity_exponent)  # (C, K)
    shards = [FactoryShard(k, [], [], []) for k in range(num_factories)]
    for c, category in enumerate(categories):
        order = None if scheme == "quantity" else rng.permutation(num_factories)
        parts = _split_category(by_category[category], weights[c], order, rng)
        for split, per_factory in parts.items():
            for shard, chunk in zip(shards, per_factory):
                getattr(shard, split).extend(r.with_domain(shard.name) for r in chunk)
    _check_min_train(shards, scheme, min_train, alpha, quantity_exponent)
    return shards


def _check_arguments(num_factories: int, scheme: str, alpha: float,
                     quantity_exponent: float, min_train: int) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"partition scheme '{scheme}' is unknown; valid schemes: "
                          f"{', '.join(SCHEMES)}")
    if not isinstance(num_factories, int) or num_factories < 1:
        raise ConfigError(f"num_factories must be an integer >= 1, got {num_factories!r}")
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    if not quantity_exponent >= 0:
        raise ConfigError(f"quantity_exponent must be >= 0, got {quantity_exponent}")
    if min_train < 0:
        raise ConfigError(f"min_train must be >= 0, got {min_train}")


def _group(records: Iterable[ImageRecord]) -> dict[str, dict[str, list[ImageRecord]]]:
    """{category: {split: records sorted by path}}; rejects unknown splits and empty input."""
    grouped: dict[str, dict[str, list[ImageRecord]]] = {}
    for record in records:
        if record.split not in SPLITS:
            raise PartitionError(f"record {record.path} has split '{record.split}'; expected one "
                                 f"of {', '.join(SPLITS)}")
        splits = grouped.setdefault(record.category, {s: [] for s in SPLITS})
        splits[record.split].append(record)
    if not grouped:
        raise PartitionError("partition: no records to split; check the dataset root and "
                             "categories")
    for splits in grouped.values():
        for split in SPLITS:
            splits[split].sort(key=lambda r: (str(r.path), r.defect))
    return grouped


def _scheme_weights(scheme: str, num_categories: int, num_factories: int,
                    rng: np.random.Generator, alpha: float,
                    quantity_exponent: float) -> np.ndarray:
    """(C, K) non-negative weights: how each category's training images spread over factories."""
    C, K = num_categories, num_factories
    if scheme == "iid":
        return np.ones((C, K))
    if scheme == "quantity":
        share = (np.arange(K) + 1.0) ** (-quantity_exponent)  # (K,) decreasing
        return np.tile(share, (C, 1))
    if scheme == "dirichlet":
        return np.stack([_dirichlet(rng, alpha, K) for _ in range(C)])
    # category: a shuffled category order, dealt round-robin to factories or vice versa.
    perm = rng.permutation(C)
    weights = np.zeros((C, K))
    if K >= C:
        for k in range(K):
            weights[perm[k % C], k] = 1.0  # several factories share one category
    else:
        for i in range(C):
            weights[perm[i], i % K] = 1.0  # one factory makes several categories
    return weights


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Dir(alpha) proportions (K,); for tiny alpha numpy can underflow to all-zero/NaN, in which
    case the whole mass goes to one random factory (the limit of alpha -> 0)."""
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


def _split_category(splits: dict[str, list[ImageRecord]], weights: np.ndarray,
                    order: np.ndarray | None,
                    rng: np.random.Generator) -> dict[str, list[list[ImageRecord]]]:
    """Shuffle one category's records and cut each split into per-factory chunks.

    Training counts follow the scheme weights; validation and test counts follow the training
    counts, so a factory is only tested on what it trains on. A category without training
    images falls back to the scheme weights for its test images (completeness wins).
    """
    train_counts = apportion(len(splits["train"]), weights, order)  # (K,)
    follow = train_counts if train_counts.sum() > 0 else weights
    counts = {
        "train": train_counts,
        "validation": apportion(len(splits["validation"]), follow, order),
        "test": apportion(len(splits["test"]), follow, order),
    }
    out: dict[str, list[list[ImageRecord]]] = {}
    for split, records in splits.items():
        shuffled = [records[i] for i in rng.permutation(len(records))]
        bounds = np.concatenate([[0], np.cumsum(counts[split])])
        out[split] = [shuffled[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def _check_min_train(shards: list[FactoryShard], scheme: str, min_train: int,
                     alpha: float, quantity_exponent: float) -> None:
    short = [s for s in shards if len(s.train) < min_train]
    if not short:
        return
    names = ", ".join(f"{s.name} ({len(s.train)})" for s in short[:5])
    if len(short) > 5:  # the error stays one readable line however many factories are short
        names += f" and {len(short) - 5} more"
    hint = {
        "dirichlet": f"a larger alpha (now {alpha})",
        "quantity": f"a smaller quantity_exponent (now {quantity_exponent})",
    }.get(scheme, "more training images")
    raise PartitionError(
        f"partition '{scheme}' left {names} with fewer than min_train={min_train} training "
        f"images among {len(shards)} factories; use fewer factories, {hint}, or a lower min_train")
