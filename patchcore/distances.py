"""Chunked Euclidean nearest-neighbour search, shared by the memory bank and the coreset tools.

Distances come from the expansion ||q - b||² = ||q||² - 2 q·b + ||b||², one matrix product per
chunk of queries. The chunk follows a memory budget in bytes (`max_bytes`), not a row count: a
chunk of c queries against M bank rows holds the (c, M) block plus the selection's scratch, so
c = budget // (2 · M · element size). Default budget: 256 MiB on CPU; on CUDA a quarter of the
free memory, capped at 2 GiB (one query of the allocator per call, not per chunk). The result is
exact whatever the chunk. Squared distances are clamped at 0 against rounding.
"""

from __future__ import annotations

import functools

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


def direct_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                     max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances of each query to its found neighbours `indices` (Q, k), recomputed in the
    direct form sum((q - b)^2): no cancellation, unlike ||q||^2 - 2 q.b + ||b||^2, whose float32
    error grows with the norms (~2e-3 relative on tire's WideResNet bank). Rows re-sorted by the
    recomputed distance (ties: lower index first). Returns (distances (Q, k), indices (Q, k))."""
    device = queries.device
    queries = queries.to(device=bank.device, dtype=bank.dtype)
    indices = indices.to(bank.device)
    missing = indices < 0  # FAISS's -1: fewer than k neighbours found (IVF-PQ probing few lists)
    q_rows, k = indices.shape
    budget = memory_budget(bank.device) if max_bytes is None else max_bytes
    chunk = max(1, budget // max(1, 2 * k * bank.shape[1] * bank.element_size()))
    out = []
    for start in range(0, q_rows, chunk):
        idx = indices[start:start + chunk].clamp(min=0)  # (c, k)
        rows = bank.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)  # (c, k, D)
        out.append(rows.sub_(queries[start:start + chunk].unsqueeze(1)).square_().sum(dim=2))
    d = torch.cat(out) if out else queries.new_zeros((0, k))
    d = d.masked_fill(missing, float("inf"))
    if k > 1:
        order = torch.argsort(indices, dim=1, stable=True)  # lower index first among equal distances
        d, indices = d.gather(1, order), indices.gather(1, order)
        order = torch.argsort(d, dim=1, stable=True)
        d, indices = d.gather(1, order), indices.gather(1, order)
    return d.to(device), indices.to(device)


# --- bf16 products, certified by exact re-ranking --------------------------------------------

BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
PAIR_BLOCK = 1 << 16  # candidate pairs re-ranked at a time
BF16_CPU_BUDGET = 16 << 20  # per chunk on CPU: the (c, M) products stay in cache for the passes
# over them (min, compare, nonzero): 2.1x the float32 search at 16 MiB vs 1.4x at 256 MiB, measured


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are a hardware fast path on `device`: CUDA with bf16 support
    (compute capability >= 8), or a CPU whose flags list avx512_bf16 / amx_bf16 (Linux)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported()) and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _cpu_has_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """avx512_bf16 or amx_bf16 among the CPU flags (read once per process)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class Bf16Search:
    """Exact 1-NN by bf16 matrix products with exact float32 re-ranking.

    The bank is centred (distances do not change; norms, and with them the rounding, shrink) and
    stored once as an augmented bf16 matrix, so that one product per query chunk gives, for every
    query i and bank row j, a certified lower bound of the squared distance ||q_i - b_j||²:
        [q_i, 1, 1, -α||q_i||, qhi_i, qlo_i] · [-2 b_j, hi_j, lo_j, ||b_j||, 1, 1]
    with hi + lo = (1 - β)||b_j||² and qhi + qlo = (1 - β)||q_i||², which is
    ||q - b||² - α||q||·||b|| - β(||b||² + ||q||²) before the output's rounding. The subtracted
    terms cover the bf16 rounding of every input (u = 2^-8 relative each; |q·b| <= ||q||·||b||)
    and float32 accumulation over D + 5 terms (γ = (D + 5)·2^-24): α = 1.02·(4.03u + 2.05γ)/(1 -
    2.01u), β = 1.02·(2.1u² + 1.1γ) + 1e-5. The output is the float32 accumulator rounded once to
    bf16 (oneDNN on CPU, cuBLAS on CUDA), which moves a value x by at most u·|x|: the per-query
    threshold is widened by that relative amount instead of a worst-case term. The bound is per
    pair, so a few large-norm bank rows (a k-center coreset keeps the outliers) do not loosen it
    for the rest.

    The passes over the (c, M) products are what cost, not the product (measured on tire: a bf16
    argmin or a nonzero over the products each cost as much as the product), so there is one:
    the bf16 values are read as int16, whose order is the float order for values >= 0 and puts
    every negative value below them, and the minimum of each block of BLOCK bank rows is taken
    (a vectorised int16 reduction). j0 = the first row of the smallest entry of the query's
    smallest block (a row with a small bound) gives an exact distance d0 (direct form, float32);
    every row that could be nearer has a bound <= d0 (widened, >= 0, so the int16 comparison is
    the float one), which only rows of blocks whose minimum passes can have: those blocks are
    gathered, their rows compared, and the candidates re-ranked exactly; the nearest (lowest index
    on ties) is returned with its exact float32 squared distance. No candidate is missed: the
    result is the exact search's up to float32 rounding of the distances (tested against float64
    brute force)."""

    BLOCK = 64  # bank rows per block minimum

    def __init__(self, bank: torch.Tensor):
        bank = bank.float().contiguous()
        self.bank = bank
        self.mean = bank.mean(dim=0)
        centred = bank - self.mean
        sq = squared_norms(centred)
        u, gamma = BF16_UNIT, (bank.shape[1] + 5) * 2.0**-24
        self.alpha = 1.02 * (4.03 * u + 2.05 * gamma) / (1.0 - 2.01 * u)  # input rounding + accumulation
        self.beta = 1.02 * (2.1 * u**2 + 1.1 * gamma) + 1e-5  # hi/lo rounding + accumulation + centring
        hi, lo = _split(sq * (1.0 - self.beta))
        ones = torch.ones_like(hi)
        columns = [(-2.0 * centred).to(torch.bfloat16), hi, lo, sq.sqrt().to(torch.bfloat16)[:, None], ones, ones]
        augmented = torch.cat(columns, dim=1)  # (M, D + 5)
        pad = -len(bank) % self.BLOCK  # rows whose bound is 2^100: never a candidate
        filler = torch.zeros((pad, augmented.shape[1]), dtype=torch.bfloat16, device=bank.device)
        filler[:, bank.shape[1]] = 2.0**100
        self.augmented = torch.cat([augmented, filler]).contiguous()  # (M + pad, D + 5)

    def search(self, queries: torch.Tensor, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> exact squared distances (Q, 1) and indices (Q, 1) of the nearest rows."""
        queries = queries.to(device=self.bank.device, dtype=torch.float32)
        if max_bytes is None:
            max_bytes = BF16_CPU_BUDGET if self.bank.device.type == "cpu" else memory_budget(self.bank.device)
        chunk = max(1, int(max_bytes) // (4 * len(self.augmented)))  # bf16 products + scratch
        dists, idxs = [], []
        for start in range(0, len(queries), chunk):
            d, i = self._chunk(queries[start : start + chunk])
            dists.append(d)
            idxs.append(i)
        if not dists:
            return queries.new_zeros((0, 1)), torch.zeros((0, 1), dtype=torch.long, device=self.bank.device)
        return torch.cat(dists).unsqueeze(1), torch.cat(idxs).unsqueeze(1)

    def _chunk(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, device = len(q), q.device
        centred = q - self.mean
        q_sq = squared_norms(centred)  # (c,)
        qhi, qlo = _split(q_sq * (1.0 - self.beta))
        ones = torch.ones((c, 2), dtype=torch.bfloat16, device=device)
        alpha = (q_sq.sqrt() * -self.alpha).to(torch.bfloat16)[:, None]
        t = torch.cat([centred.to(torch.bfloat16), ones, alpha, qhi, qlo], dim=1) @ self.augmented.T  # (c, M')
        keys = t.view(torch.int16).view(c, -1, self.BLOCK)  # (c, blocks, BLOCK)
        block_min = keys.amin(dim=2)  # (c, blocks): the one pass over the products
        first = block_min.argmin(dim=1)  # (c,)
        rows_c = torch.arange(c, device=device)
        j0 = first * self.BLOCK + keys[rows_c, first].argmin(dim=1)  # (c,) a row with a small bound
        d0 = torch.sub(q, self.bank.index_select(0, j0)).square_().sum(dim=1)  # exact, direct form
        # + the float32 rounding of d0, then the product's one bf16 rounding (<= u·|x|), rounded up
        bound = d0 * (1.0 + 1e-4) / (1.0 - 1.01 * BF16_UNIT)  # (c,) >= 0
        limit = bound.to(torch.bfloat16)
        limit = torch.where(limit.float() < bound, torch.nextafter(limit, torch.full_like(limit, float("inf"))), limit)
        limit = limit.view(torch.int16)  # >= 0: int16 order = float order, negatives below
        qb, bb = torch.nonzero(block_min <= limit[:, None], as_tuple=True)  # candidate blocks
        lane_q, lane = torch.nonzero(keys[qb, bb] <= limit.index_select(0, qb)[:, None], as_tuple=True)
        rows = qb.index_select(0, lane_q)
        cols = bb.index_select(0, lane_q) * self.BLOCK + lane
        del t, keys
        others = cols != j0.index_select(0, rows)  # j0's distance is d0 already
        rows = torch.cat([rows_c, rows[others]])
        cols = torch.cat([j0, cols[others]])
        best = torch.full((c,), float("inf"), device=device)
        dist = torch.empty(len(rows), device=device)
        dist[:c] = d0
        for a in range(c, len(rows), PAIR_BLOCK):
            r, k = rows[a : a + PAIR_BLOCK], cols[a : a + PAIR_BLOCK]
            dist[a : a + PAIR_BLOCK] = torch.sub(q.index_select(0, r),
                                                 self.bank.index_select(0, k)).square_().sum(dim=1)
        best.scatter_reduce_(0, rows, dist, reduce="amin")
        at_best = dist == best.index_select(0, rows)
        index = torch.full((c,), len(self.bank), dtype=torch.long, device=device)
        index.scatter_reduce_(0, rows[at_best], cols[at_best], reduce="amin")
        return best, index


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float32 -> bf16 (n, 1) columns hi, lo with hi + lo = values to ~2^-16 relative."""
    hi = values.to(torch.bfloat16)
    lo = (values - hi.float()).to(torch.bfloat16)
    return hi[:, None], lo[:, None]
