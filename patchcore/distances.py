"""Chunked Euclidean nearest-neighbour search, shared by the memory bank and the coreset tools.

Distances come from the expansion ||q - b||² = ||q||² - 2 q·b + ||b||², one matrix product per
chunk of queries, so memory stays bounded (`max_elements` entries of the query×bank block) on
CPU and CUDA alike. Squared distances are clamped at 0 against rounding.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_ELEMENTS = 1 << 25  # 32M floats = 128 MiB per query×bank block


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N,) squared L2 norms."""
    return torch.einsum("nd,nd->n", x, x)


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of each query row in `bank`.

    queries (Q, D), bank (M, D) -> distances (Q, k) ascending, indices (Q, k) into bank.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"shape mismatch: queries {tuple(queries.shape)} vs bank {tuple(bank.shape)}")
    if k < 1 or k > len(bank):
        raise ValueError(f"k={k} outside [1, bank size {len(bank)}]")
    queries = queries.to(device=bank.device, dtype=bank.dtype)
    bank_sq = squared_norms(bank)  # (M,)
    chunk = max(1, max_elements // max(1, len(bank)))
    dists, idxs = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]  # (c, D)
        d2 = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, beta=1.0, alpha=-2.0)  # (c, M)
        d2.add_(squared_norms(q).unsqueeze(1)).clamp_(min=0.0)
        values, indices = torch.topk(d2, k, dim=1, largest=False)  # (c, k)
        dists.append(values)
        idxs.append(indices)
    d = torch.cat(dists) if dists else queries.new_zeros((0, k))
    i = torch.cat(idxs) if idxs else torch.zeros((0, k), dtype=torch.long, device=bank.device)
    return (d if squared else d.sqrt()), i
