"""Server-side aggregation: turn the factories' local coresets into one global memory bank.

The global bank gets a budget B = int(total patches x global_ratio), the same size a centralized
PatchCore with that ratio would keep over the union of all factories' patches. Three methods:

- `coreset_of_coresets` (ours): greedy k-center over the union U of the local coresets. Each
  local coreset covers its factory's patches within its radius r_k; k-center over U then covers
  U within r_U, so every patch of every factory lies within r_k + r_U of the bank: the two-level
  greedy keeps PatchCore's coverage guarantee (up to a constant) without moving raw features.
- `concat`: keep U as is (upper bound on what the server could know; no budget).
- `random`: a baseline; each factory's budget share drawn uniformly from what it sent.

Payloads are sorted by factory id first, so the result does not depend on arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from federated.config import AGGREGATIONS as METHODS  # named with the config, which checks them without torch
from federated.errors import PayloadError
from federated.partition import apportion
from federated.payload import Payload
from patchcore.coreset import coreset_size, greedy_coreset
from patchcore.errors import ConfigError


@dataclass
class AggregationResult:
    """The global bank and the bookkeeping the report needs."""

    bank: torch.Tensor  # (M, D) float32, on the CPU
    budget: int  # B = coreset_size(sum of num_patches, global_ratio)
    shares: list[int]  # B_k per factory (in `factory_ids` order); sums to min(B, |U|)
    source: np.ndarray  # (M,) int64: factory id of each bank row
    method: str
    factory_ids: list[int]  # sorted
    union_sizes: list[int]  # vectors each factory sent (in `factory_ids` order)

    @property
    def union_size(self) -> int:
        """|U|: vectors the server received in total."""
        return int(sum(self.union_sizes))

    def kept_per_factory(self) -> dict[int, int]:
        """{factory id: bank rows that came from it}, zeros included."""
        counts = {fid: 0 for fid in self.factory_ids}
        ids, n = np.unique(self.source, return_counts=True)
        counts.update({int(i): int(c) for i, c in zip(ids, n)})
        return counts


def budget_shares(budget: int, num_patches: list[int], caps: list[int]) -> list[int]:
    """Split `budget` over factories in proportion to their patch counts (largest remainder),
    never giving a factory more than it sent (`caps`); what a capped factory cannot take is
    redistributed over the others, by the same rule, until the budget or the vectors run out.

    The result sums to min(budget, sum(caps)); ties go to the earlier factory.
    """
    caps_ = np.asarray(caps, dtype=np.int64)  # (K,)
    weights = np.asarray(num_patches, dtype=np.float64)  # (K,)
    shares = np.zeros(len(caps_), dtype=np.int64)
    remaining = int(min(budget, caps_.sum()))
    while remaining > 0:
        active = shares < caps_
        w = np.where(active, weights, 0.0)
        if w.sum() <= 0:
            w = active.astype(np.float64)  # only patch-less senders left: share equally
        grown = np.minimum(shares + apportion(remaining, w), caps_)
        remaining -= int((grown - shares).sum())
        shares = grown
    return [int(s) for s in shares]


def aggregate(payloads: list[Payload], *, method: str = "coreset_of_coresets",
              global_ratio: float = 0.1, seed: int = 0, coreset_method: str = "approximate",
              projection_dim: int | None = 128, num_starts: int = 10, progress: bool = False,
              device: str | torch.device = "cpu") -> AggregationResult:
    """Build the global bank from validated payloads (see the module docstring for methods).

    `device` only says where the greedy selection runs (a GPU makes large unions fast); the
    returned bank is on the CPU.
    """
    if method not in METHODS:
        raise ConfigError(f"aggregation method '{method}' is unknown; valid: "
                          f"{', '.join(METHODS)}")
    ordered = _check_consistent(payloads)
    sizes = [p.num_vectors for p in ordered]
    budget = coreset_size(sum(p.num_patches for p in ordered), global_ratio)
    shares = budget_shares(budget, [p.num_patches for p in ordered], sizes)
    union = torch.cat([torch.from_numpy(p.decoded()) for p in ordered])  # (U, D)
    source = np.repeat([p.factory_id for p in ordered], sizes).astype(np.int64)  # (U,)
    if method == "concat" or (method == "coreset_of_coresets" and len(union) <= budget):
        keep = torch.arange(len(union))
    elif method == "coreset_of_coresets":
        keep = greedy_coreset(union.to(device), budget, method=coreset_method,
                              projection_dim=projection_dim, num_starts=num_starts, seed=seed,
                              progress=progress).cpu()
    else:
        keep = torch.from_numpy(_random_picks(sizes, shares, seed))
    return AggregationResult(
        bank=union[keep].contiguous(), budget=budget, shares=shares,
        source=source[keep.numpy()], method=method,
        factory_ids=[p.factory_id for p in ordered], union_sizes=sizes)


def _check_consistent(payloads: list[Payload]) -> list[Payload]:
    """Payloads sorted by factory id; one per factory, one dimension, one backbone."""
    if not payloads:
        raise PayloadError("aggregation received no payloads; no factory reported features")
    ordered = sorted(payloads, key=lambda p: p.factory_id)
    ids = [p.factory_id for p in ordered]
    if len(set(ids)) != len(ids):
        raise PayloadError(f"aggregation received several payloads from one factory: {ids}")
    dims = {(p.factory_id, int(p.features.shape[1]) if p.features.ndim == 2 else -1)
            for p in ordered}
    if len({d for _, d in dims}) != 1:
        found = ", ".join(f"factory-{f}: {d}" for f, d in sorted(dims))
        raise PayloadError(f"aggregation received inconsistent feature dimensions ({found})")
    backbones = {p.backbone_id for p in ordered}
    if len(backbones) != 1:
        raise PayloadError(f"aggregation received features from several backbones: "
                           f"{', '.join(sorted(backbones))}")
    return ordered


def _random_picks(sizes: list[int], shares: list[int], seed: int) -> np.ndarray:
    """Union indices: `shares[k]` rows drawn uniformly without replacement from factory k."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    picks = [start + np.sort(rng.choice(n, size=b, replace=False))
             for start, n, b in zip(starts, sizes, shares)]
    return np.concatenate(picks).astype(np.int64)
