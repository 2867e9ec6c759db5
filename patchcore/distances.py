"""Chunked Euclidean nearest-neighbour search, shared by the memory bank and the coreset tools.

Distances come from the expansion ||q - b||² = ||q||² - 2 q·b + ||b||², one matrix product per
chunk of queries. The chunk follows a memory budget in bytes (`max_bytes`), not a row count: a
chunk of c queries against M bank rows holds the (c, M) block plus the selection's scratch, so
c = budget // (2 · M · element size). Default budget: 256 MiB on CPU; on CUDA a quarter of the
free memory, capped at 2 GiB (one query of the allocator per call, not per chunk). The result is
exact whatever the chunk. Squared distances are clamped at 0 against rounding.
"""

from __future__ import annotations

import torch

CPU_BUDGET = 256 << 20  # bytes of working memory per chunk on CPU
CUDA_BUDGET_CAP = 2 << 30  # at most this much on a GPU, and at most a quarter of what is free


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N,) squared L2 norms."""
    return torch.einsum("nd,nd->n", x, x)


def memory_budget(device: torch.device) -> int:
    """Bytes a chunk may use on `device` (module docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(CUDA_BUDGET_CAP, free // 4))
    return CPU_BUDGET


def chunk_rows(bank_rows: int, element_size: int, max_bytes: int) -> int:
    """Queries per chunk so that the (chunk, bank_rows) block and its scratch fit `max_bytes`."""
    return max(1, int(max_bytes) // (2 * max(1, bank_rows) * element_size))


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    max_bytes: int | None = None,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of each query row in `bank`.

    queries (Q, D), bank (M, D) -> distances (Q, k) ascending, indices (Q, k) into bank.
    `max_bytes`: working memory per chunk (default: `memory_budget` of the bank's device).
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"shape mismatch: queries {tuple(queries.shape)} vs bank {tuple(bank.shape)}")
    if k < 1 or k > len(bank):
        raise ValueError(f"k={k} outside [1, bank size {len(bank)}]")
    queries = queries.to(device=bank.device, dtype=bank.dtype)
    bank_sq = squared_norms(bank)  # (M,)
    budget = memory_budget(bank.device) if max_bytes is None else max_bytes
    chunk = chunk_rows(len(bank), bank.element_size(), budget)
    dists, idxs = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]  # (c, D)
        d2 = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, beta=1.0, alpha=-2.0)  # (c, M)
        d2.add_(squared_norms(q).unsqueeze(1)).clamp_(min=0.0)
        if k == 1:  # a min is one pass; topk sorts
            values, indices = d2.min(dim=1, keepdim=True)  # (c, 1)
        else:
            values, indices = torch.topk(d2, k, dim=1, largest=False)  # (c, k)
        dists.append(values)
        idxs.append(indices)
    d = torch.cat(dists) if dists else queries.new_zeros((0, k))
    i = torch.cat(idxs) if idxs else torch.zeros((0, k), dtype=torch.long, device=bank.device)
    return (d if squared else d.sqrt()), i
