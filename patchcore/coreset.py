"""Greedy k-center coreset selection, as in PatchCore (Roth et al., CVPR 2022).

Faithful to the official implementation (patchcore-inspection `sampler.py`):
- features are first mapped by a random linear projection to `projection_dim` = 128 dims
  (a bias-free `nn.Linear` initialisation: U(-1/sqrt(D), 1/sqrt(D))), skipped when D <= 128;
- `approximate` (the paper default): the min-distance vector starts as the MEAN distance of each
  point to `num_starts` = 10 random starting points (which are not themselves selected);
- `exact`: it starts as the L2 norm of each point's row of the full distance matrix. We compute
  that row norm in closed form (sum_j ||x_i - x_j||² = N||x_i||² - 2 x_i·Σx_j + Σ||x_j||²), so
  exact mode never builds the N×N matrix, yet picks the same points;
- then each step selects the argmax of the min-distance vector and lowers it with the distances
  to the new pick. We keep squared distances (same argmax, no sqrt per step) and update them with
  one matrix-vector product per step (on the CPU as blocked row sums, `_RowDots`; on CUDA one
  fused addmv).
The coreset size is int(N × ratio), as upstream, but never below 1.

`precision="bfloat16"` (ours, not upstream) stores the projected (N, P) matrix in bf16: half the
memory traffic of the per-step product, which is what bounds a step (on this CPU the row-major
bf16 matrix-vector product is ~1.4x faster than fp32; measured in experiments/bench/coreset.py).
The features are centred before rounding (distances do not change under translation, but the
squared norms shrink, and with them the cancellation in ||x||² - 2 x·s + ||s||²); norms and the
running minima stay float32, and on CUDA the product accumulates and returns float32. The picks
are then those of the rounded points, not the reference loop's: measure the coverage radius.

Per step: a two-stage argmax (block maxima, then the first block holding the max: the same index
as torch.argmax, 5x faster on CPU at 100k points), one matrix-vector product, one minimum. The
loop never synchronises with the host: the argmax is written straight into the on-device index
vector, and the new pick is gathered with index_select (an index tensor, never an int).

Pruning (ours, default on CPU; the picks are those of the plain loop, same ties): after the
first few hundred picks almost every point is far from the new centre, and its running minimum
cannot move. A fixed orthonormal basis U of the top `PRUNE_DIMS` principal directions gives, for
every point, a lower bound of its squared distance to the new centre s,
    ||x - s||² >= ||Uᵀ(x - s)||² + (r_x - r_s)²,   r_x = ||(I - UUᵀ)(x - μ)|| (residual norm),
which costs one (N, 18) matrix-vector product instead of the (N, P) one. Only the points whose
bound is below their running minimum (minus a rounding margin) are gathered and get the plain
loop's exact update, with the same arithmetic (`_RowDots`: row-independent, bitwise equal;
tested); the others provably keep their minimum. On 100k real tire embeddings (152-d), about
1% of the points are gathered per step. The bound needs the host to know which points survive
(one sync per step), so on CUDA the plain, sync-free loop stays (`pruning="auto"`); bf16 storage
also keeps the plain loop (its bf16-rounded products would need a far wider margin).

Deliberate non-default option: a `projection_dim` at or above the features' dimension (no
projection) instead of the paper's 128: on 100k real tire embeddings (Lite0, 152-d) the pruned
unprojected greedy covers with a 10% smaller radius than anomalib's KCenterGreedy, 110x faster;
the paper's 128-d projection is 125x faster at a 4.5% larger radius
(experiments/studies/speed_pruned_coreset_bf16_search.md).
"""

from __future__ import annotations

import torch

from patchcore.config import CORESET_METHODS as METHODS  # the config's lists: one of each
from patchcore.config import CORESET_PRECISIONS as PRECISIONS
from patchcore.config import CORESET_PRUNING as PRUNING
from patchcore.distances import nearest_neighbours, squared_norms
from patchcore.errors import ConfigError
from patchcore.progress import track

PRUNE_DIMS = 16  # principal directions of the lower bound (p=16: ~1.3% of points gathered per step on tire)
PRUNE_SAMPLE = 16384  # rows the covariance of the basis is estimated from (any orthonormal basis is valid)


def coreset_size(n: int, ratio: float) -> int:
    """Number of points a ratio keeps out of `n`: int(n × ratio), at least 1 (for n >= 1)."""
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
        raise ConfigError(f"coreset ratio must be in (0, 1], got {ratio!r}")
    return min(n, max(1, int(n * float(ratio)))) if n > 0 else 0


def random_projection(dim_in: int, dim_out: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(dim_out, dim_in) matrix distributed as a default bias-free nn.Linear weight, seeded."""
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / dim_in**0.5
    weight = torch.rand((dim_out, dim_in), generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return weight.to(device)


def project(features: torch.Tensor, projection_dim: int | None, seed: int,
            chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """(N, D) -> (N, P) float32: the random projection, or the features as float32 when D <= P or
    P is None. Projects block by block of rows (each block cast to float32 on its own, about
    `chunk_bytes` of it at a time), so an fp16 or memory-mapped (N, D) store is never copied
    whole: only the (N, P) result is allocated."""
    n, d = features.shape
    if projection_dim is None or d <= projection_dim:
        return features.float()
    weight_t = random_projection(d, projection_dim, seed, features.device).T  # (D, P)
    out = torch.empty((n, projection_dim), dtype=torch.float32, device=features.device)
    rows = max(1, chunk_bytes // (4 * d))
    for start in range(0, n, rows):
        torch.mm(features[start : start + rows].float(), weight_t, out=out[start : start + rows])
    return out


def _initial_min_distances(x: torch.Tensor, method: str, num_starts: int, seed: int) -> torch.Tensor:
    """(N, P) -> (N,) squared 'distance to the selected set' before the first pick."""
    sq = squared_norms(x)  # (N,)
    n = len(x)
    if method == "exact":
        total = n * sq - 2.0 * (x @ x.sum(0)) + sq.sum()  # sum_j ||x_i - x_j||², (N,)
        return total.clamp_(min=0.0)  # = row norm² of the distance matrix
    gen = torch.Generator().manual_seed(int(seed) + 1)
    starts = torch.randperm(n, generator=gen)[: min(num_starts, n)].to(x.device)
    d, _ = nearest_neighbours(x, x[starts], k=len(starts))  # (N, s) Euclidean
    return d.mean(dim=1).square()


def _storage(x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) float32 -> (the points the loop works on, float32 (N, P); their (N, P) storage).

    bfloat16: the centred points rounded to bf16, so that norms, starts and products all describe
    the same (rounded) points."""
    if precision == "float32":
        return x, x
    xs = (x - x.mean(dim=0)).to(torch.bfloat16)  # (N, P)
    return xs.float(), xs


class _RowDots:
    """x_i·s for rows x_i of a float32 (k, P) matrix, each row's value independent of which other
    rows are computed with it: an elementwise product and a row sum, block by block. BLAS gemv
    (addmv) is not row-independent (its rounding depends on a row's position in the matrix;
    measured), and the pruned loop's picks equal the plain loop's only because both compute a
    point's distance with this same arithmetic. On the CPU, blocks of `BLOCK` rows keep the
    product in cache: 3.4x faster than one addmv over 100k x 152 here (1.7 vs 5.8 ms)."""

    BLOCK = 8192

    def __init__(self, dim: int, device: torch.device):
        self.cuda = device.type == "cuda"  # one block: the product fits, and launches are few
        self.buffer = None if self.cuda else torch.empty((self.BLOCK, dim), dtype=torch.float32)

    def __call__(self, rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            return torch.mul(rows, s).sum(dim=1)
        out = torch.empty(len(rows), dtype=torch.float32)
        for start in range(0, len(rows), self.BLOCK):
            block = rows[start : start + self.BLOCK]
            product = torch.mul(block, s, out=self.buffer[: len(block)])
            torch.sum(product, dim=1, out=out[start : start + len(block)])
        return out


def _partial_distances(xs: torch.Tensor, sq: torch.Tensor):
    """For the (N, P) storage `xs` and float32 norms `sq` (N,): a function idx (1,) -> the float32
    (N,) vector ||x_i||² - 2 x_i·x_idx."""
    if xs.dtype == torch.float32:
        if xs.is_cuda:  # one fused product: memory-bound, no host sync
            return lambda idx: torch.addmv(sq, xs, xs.index_select(0, idx).squeeze(0), alpha=-2.0)
        dots = _RowDots(xs.shape[1], xs.device)  # the pruned loop's arithmetic (and faster here)
        return lambda idx: torch.add(sq, dots(xs, xs.index_select(0, idx).squeeze(0)), alpha=-2.0)
    if xs.is_cuda:
        try:  # bf16 inputs, fp32 accumulation and output (torch >= 2.8 on CUDA)
            torch.mm(xs[:1], xs[:1].T, out_dtype=torch.float32)
            return lambda idx: sq.add(torch.mm(xs, xs.index_select(0, idx).T, out_dtype=torch.float32).squeeze(1),
                                      alpha=-2.0)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    # CPU: bf16 matrix-vector product on the row-major (N, P) matrix (fp32 accumulation inside,
    # bf16 result): 1.4x faster than the fp32 addmv here; the (P, N)-transposed bf16 mv is 2x slower.
    return lambda idx: sq.add(torch.mv(xs, xs.index_select(0, idx).squeeze(0)), alpha=-2.0)


class _Argmax:
    """The first index of the maximum of an (N,) float32 vector, in two passes: the max of each
    block of `block` values (a vectorised reduction), then the argmax within the first block that
    holds the overall max. Same index as torch.argmax (ties go to the lowest index), ~5x faster
    on CPU at N = 100k (torch's argmax is not vectorised: 0.15 ms vs 0.03 ms), and it never
    leaves the device. The vector lives in `self.values`, a view of a -inf padded buffer."""

    def __init__(self, values: torch.Tensor, block: int = 1024):
        n = len(values)
        self.block = block
        self.blocks = max(1, -(-n // block))
        self.buffer = torch.full((self.blocks * block,), float("-inf"), dtype=values.dtype, device=values.device)
        self.buffer[:n] = values
        self.values = self.buffer[:n]
        self.grid = self.buffer.view(self.blocks, block)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """Writes the index into `out` (shape (1,), long) and returns it."""
        best_block = torch.argmax(self.grid.amax(dim=1), dim=0, keepdim=True)  # (1,)
        within = torch.argmax(self.grid.index_select(0, best_block), dim=1)  # (1,)
        return torch.add(within, best_block, alpha=self.block, out=out)


def greedy_coreset(
    features: torch.Tensor,
    size: int,
    *,
    method: str = "approximate",
    projection_dim: int | None = 128,
    num_starts: int = 10,
    seed: int = 0,
    precision: str = "float32",
    pruning: str = "auto",
    progress: bool = False,
    stats: dict | None = None,
) -> torch.Tensor:
    """Indices (size,) of the greedy k-center picks among the rows of `features` (N, D).

    `pruning`: "auto" (the bound-pruned loop on CPU in float32, the plain loop otherwise), "on",
    "off"; the picks do not depend on it (module docstring). `stats`: a dict that receives which
    loop ran ("loop") and, for the pruned one, the points updated over all steps ("updated") and
    the steps that updated every point ("full_steps")."""
    if method not in METHODS:
        raise ConfigError(f"unknown coreset method {method!r}; choose one of {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown coreset precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if pruning not in PRUNING:
        raise ConfigError(f"unknown coreset pruning {pruning!r}; choose one of {', '.join(PRUNING)}")
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {tuple(features.shape)}")
    n = len(features)
    if size >= n:
        return torch.arange(n, device=features.device)
    if size < 1:
        raise ConfigError(f"coreset size must be >= 1, got {size}")
    picks = torch.empty(size, dtype=torch.long, device=features.device)  # a normal tensor for callers
    with torch.inference_mode():
        # Row-major (N, P): the matrix-vector product streams it once per step. (A transposed
        # (P, N) copy measured no faster in fp32 on an idle machine and 2x slower in bf16.)
        x, xs = _storage(project(features, projection_dim, seed).contiguous(), precision)  # (N, P) each
        sq = squared_norms(x)  # (N,)
        argmax = _Argmax(_initial_min_distances(x, method, num_starts, seed))
        min_d = argmax.values  # (N,), the squared distance of each point to the selected set
        steps = track(range(size), f"coreset {n}->{size}", progress, leave=False)
        pruned = _use_pruning(pruning, x, precision)
        if stats is not None:
            stats["loop"] = "pruned" if pruned else "plain"
        if pruned:
            counts = _pruned_loop(x, sq, argmax, picks, steps)
            if stats is not None:
                stats.update(counts)
            return picks
        del x
        partial = _partial_distances(xs, sq)
        for step in steps:
            idx = argmax(out=picks[step : step + 1])  # (1,), on device
            d = partial(idx)  # ||x_i||² - 2 x_i·s, (N,) float32
            d += sq.index_select(0, idx)  # + ||s||²
            torch.minimum(min_d, d, out=min_d)
    return picks


def _use_pruning(pruning: str, x: torch.Tensor, precision: str) -> bool:
    """Whether the pruned loop runs (module docstring): "auto" = CPU, float32 storage, and more
    dimensions than the bound's basis; "on" anywhere float32 (e.g. to test it on CUDA)."""
    if pruning == "off" or precision != "float32" or x.shape[1] <= PRUNE_DIMS:
        return False
    return pruning == "on" or x.device.type == "cpu"


def _bound_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) -> mean μ (P,) and an orthonormal (P, PRUNE_DIMS) basis of the top principal
    directions, from the covariance of at most PRUNE_SAMPLE evenly spaced rows (float64 eigh)."""
    step = max(1, len(x) // PRUNE_SAMPLE)
    sample = x[::step].double()
    mu = sample.mean(dim=0)
    centred = sample - mu
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return mu.float(), vectors[:, -PRUNE_DIMS:].float().contiguous()


def _pruned_loop(x: torch.Tensor, sq: torch.Tensor, argmax: _Argmax, picks: torch.Tensor, steps) -> dict:
    """The plain loop's picks, skipping the points the new centre provably cannot improve.

    x (N, P) float32 points, sq (N,) their squared norms, argmax holding the (N,) running minima.
    Each point gets coordinates z = (Uᵀ(x - μ), r) in PRUNE_DIMS + 1 dimensions, r its residual
    norm (computed from the residual vector, not as a difference of squares, which cancels); then
    ||z_i - z_s||² <= ||x_i - x_s||², and one matrix-vector product of [z, 1] with [-2 z_s, c_s]
    gives the whole bound. Rounding: the bound is lowered by κ·(||x_i||² + ||z_i||² + ||x_s||² +
    ||z_s||²), κ = 4·P·ε32, above the worst-case float32 error of either expansion (the bound's
    and the update's), so a skipped point's update would not have lowered its minimum either."""
    min_d = argmax.values
    mu, basis = _bound_basis(x)
    centred = x - mu
    y = centred @ basis  # (N, p) coordinates in the basis
    residual = torch.linalg.vector_norm(torch.addmm(centred, y, basis.T, alpha=-1.0), dim=1)  # (N,)
    del centred
    # stored transposed, (p+2, N): the product streams p+2 contiguous rows (134 vs 174 µs at 100k)
    zt = torch.cat([y.T, residual[None], torch.ones_like(residual)[None]], dim=0).contiguous()
    z = zt.T  # (N, p+2) view
    del y
    z_sq = squared_norms(z[:, :-1])
    kappa = 4.0 * x.shape[1] * torch.finfo(torch.float32).eps
    share = z_sq - kappa * (sq + z_sq)  # ||z_i||² less point i's share of the margin
    # per point, the vector its turn as the new centre multiplies [z, 1] by: [-2 z_s, share_s]
    weights = torch.cat([z[:, :-1] * -2.0, share[:, None]], dim=1).contiguous()  # (N, p+2)
    dots = _RowDots(x.shape[1], x.device)  # the plain loop's arithmetic, row for row
    dense = len(x) // 4  # above this many survivors one full update is cheaper than gathering them
    updated = full_steps = 0
    for step in steps:
        idx = argmax(out=picks[step : step + 1])  # (1,)
        centre = x.index_select(0, idx).squeeze(0)  # (P,)
        centre_sq = sq.index_select(0, idx)  # (1,)
        bound = torch.addmv(share, z, weights.index_select(0, idx).squeeze(0))  # (N,) ||z_i - z_s||² less the margin
        near = torch.nonzero(bound < min_d).squeeze(1)  # (k,), ~1% of N after the first picks
        if len(near) > dense:  # the first picks: the plain loop's own update
            d = torch.add(sq, dots(x, centre), alpha=-2.0)
            d += centre_sq
            torch.minimum(min_d, d, out=min_d)
            updated += len(x)
            full_steps += 1
            continue
        updated += len(near)
        d = torch.add(sq.index_select(0, near), dots(x.index_select(0, near), centre), alpha=-2.0)
        d += centre_sq
        min_d.index_copy_(0, near, torch.minimum(min_d.index_select(0, near), d))
    return {"updated": updated, "full_steps": full_steps}


def coverage_radius(bank: torch.Tensor, features: torch.Tensor) -> float:
    """max over features of the Euclidean distance to the nearest bank row: what k-center minimises."""
    d, _ = nearest_neighbours(features.float(), bank.float(), k=1)
    return float(d.max()) if len(d) else 0.0
