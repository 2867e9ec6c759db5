"""DP-PaDiM: a PaDiM-style Gaussian model released with (ε, δ)-differential privacy per training IMAGE.

Privacy unit: one training image, with all of its patches (add/remove-one-image adjacency). Each
factory releases noisy sums of per-image statistics; whatever one image contributes to a sum is
clipped, as a whole, to a fixed radius, so adding or removing the image moves that sum by at most
the radius (its L2 sensitivity). Every sum gets Gaussian noise and the whole release is accounted
with Gaussian DP (federated/accounting.py): μ = sqrt(Σ (Δ_i/σ_i)²), exact, and ε at the stated δ.

What one factory releases, per image i with embeddings x_il (position l of L, d channels of a
data-independent channel subset), after centring (`centre="image"`: x_il minus the image's own
mean embedding, a function of that image alone; `"none"`: raw):

- count      N = number of images                                  (Δ = 1), only with a mean
- mean       Σ_i A_i, A_i (G_m, d) = the image's mean vector per position block   (Δ = clip.mean)
- second     Σ_i B_i, B_i (G_c, d, d) = the image's mean of x xᵀ per block        (Δ = clip.second)
             released as [diagonal, sqrt(2)·upper triangle] so the vector's norm is ||B_i||_F:
             noise σ on each diagonal entry, σ/sqrt(2) on each off-diagonal one
- scale      Σ_i T_i, T_i (G_s,) = the image's mean |x|² per position block       (Δ = clip.scale)

Blocks are squares of `*_block` grid positions (None: the whole grid, one block). With
`centre="image"` and one mean block, A_i is identically 0 and is not released, and then neither
is the count: without a mean, N only scales the covariance, its noise floor and the block
variances alike, which changes no ranking of Mahalanobis scores, so the server uses a nominal N
(the budget goes to the parts that matter; at ε = inf the exact count is sent, free). Each of A_i, B_i,
T_i is scaled down as a whole when its L2/Frobenius norm exceeds its radius (per-image clipping,
the image-level analogue of DP-SGD's per-example clipping). The radii must not be tuned on the
private data: `public_clips` measures them (a quantile of the per-image norms) on PUBLIC images
through the same backbone, and the study uses AutoVI's engine_wiring training images for that.

The server adds the factories' releases (their noises add up) and post-processes, which costs no
privacy: N̂ = the noisy count (a nominal N when none is sent); block means μ = ΣA/N̂; covariance per block
(ΣB − N̂·mean(μμᵀ))/(N̂ − 1), eigenvalues floored at `floor` × the spectral edge of the summed
noise (sqrt(2d)·σ_second·sqrt(sites)/(N̂ − 1), known because σ is public) plus PaDiM's 0.01·I;
per scale block a variance ratio r_s = (E|x − μ|² in s) / trace(Σ). A query patch scores
Mahalanobis(x − μ_l; Σ_l) / sqrt(r_s(l)), image score = max patch, maps as PaDiM's.

With ε = inf, clips = inf, `centre="none"` and blocks of 1 position, the released sums are
PaDiM's exact statistics (count, Σx, Σxxᵀ per position) and the model is PaDiM (tested).

Covered: everything each factory sends (count, sums, second moments, scales); the server's sums
and the model are post-processing. Each factory's guarantee is with respect to its own images
and holds whatever the other factories send. Not covered: the query side (test images are scored
as they are); the public choices (channel subset, blocks, clip radii from public images, budget
shares) are data-independent by construction; implementation gaps: torch's PRNG in floating
point, not a cryptographic sampler over exact reals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Sequence

import torch

from federated.accounting import Ledger, Part, mu_for, sigma_for, split
from patchcore.config import ModelConfig
from patchcore.errors import ConfigError, DataError
from patchcore.model import scores_from_patches
from patchcore.padim import DEFAULT_DIMS, DEFAULT_EPS, PadimGaussian, mahalanobis, select_dims

CENTRES = ("image", "none")
PARTS = ("count", "mean", "second", "scale")
DEFAULT_SHARES = {"count": 0.05, "mean": 0.25, "second": 0.45, "scale": 0.25}
NOMINAL_COUNT = 2.0  # the N used when no count is released (any value gives the same rankings)
MIN_SCALE = 0.05  # variance ratios below this are taken as this (a block can't be near-deterministic)
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Clips:
    """Per-image radii (L2 / Frobenius) of the mean, second-moment and scale statistics.
    math.inf = no clipping (only allowed with ε = inf)."""

    mean: float = math.inf
    second: float = math.inf
    scale: float = math.inf

    def __post_init__(self) -> None:
        for name in ("mean", "second", "scale"):
            value = getattr(self, name)
            if not (value > 0):
                raise ConfigError(f"dp_padim: clip radius '{name}' must be > 0, got {value}")


@dataclass(frozen=True)
class DpPadimSpec:
    """The public settings of one DP-PaDiM release (the same at every factory)."""

    epsilon: float
    delta: float = 1e-5
    dims: int | None = DEFAULT_DIMS
    seed: int = 0  # draws the channel subset (data-independent)
    centre: str = "image"
    mean_block: int | None = None
    cov_block: int | None = None
    scale_block: int | None = 4
    clips: Clips = field(default_factory=Clips)
    shares: tuple[tuple[str, float], ...] = tuple(DEFAULT_SHARES.items())
    floor: float = 1.0
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        if not (self.epsilon > 0):
            raise ConfigError(f"dp_padim: epsilon must be > 0 (inf = no noise), got {self.epsilon}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"dp_padim: delta must be in (0, 1), got {self.delta}")
        if self.centre not in CENTRES:
            raise ConfigError(f"dp_padim: centre must be one of {CENTRES}, got {self.centre!r}")
        for name in ("mean_block", "cov_block", "scale_block"):
            b = getattr(self, name)
            if b is not None and not (isinstance(b, int) and b >= 1):
                raise ConfigError(f"dp_padim: {name} must be an integer >= 1 or None, got {b!r}")
        if self.cov_block is not None and self.scale_block is not None and self.cov_block % self.scale_block:
            # a scale block's variance is compared with the trace of the one covariance block it lies in
            raise ConfigError(f"dp_padim: cov_block {self.cov_block} must be a multiple of scale_block "
                              f"{self.scale_block}")
        shares = dict(self.shares)
        if set(shares) - set(PARTS) or any(not (w >= 0) for w in shares.values()):
            raise ConfigError(f"dp_padim: shares must be >= 0 for parts among {PARTS}, got {shares}")
        if math.isfinite(self.epsilon):
            for part in self.released():
                if shares.get(part, 0) <= 0:
                    raise ConfigError(f"dp_padim: released part {part!r} has no budget share")
                if part != "count" and math.isinf(getattr(self.clips, part)):
                    raise ConfigError(f"dp_padim: a finite epsilon needs a finite clip radius for {part!r}")
        if not (self.floor >= 0):
            raise ConfigError(f"dp_padim: floor must be >= 0, got {self.floor}")

    def released(self) -> tuple[str, ...]:
        """The parts a factory sends: the mean only when it is not identically 0."""
        parts = ["second"]
        if not (self.centre == "image" and self.mean_block is None):
            parts[:0] = ["count", "mean"]
        elif math.isinf(self.epsilon):
            parts.insert(0, "count")  # exact and free when nothing is private anyway
        if self.scale_block is not None:
            parts.append("scale")
        return tuple(parts)

    def sigmas(self) -> dict[str, float]:
        """Noise scale of each released part: σ_i = Δ_i/μ_i, μ_i = μ(ε, δ)·sqrt(share_i)."""
        shares = dict(self.shares)
        mus = split(mu_for(self.epsilon, self.delta), {p: shares[p] for p in self.released()}) \
            if math.isfinite(self.epsilon) else {p: math.inf for p in self.released()}
        return {p: sigma_for(self.sensitivity(p), mus[p]) if math.isfinite(self.sensitivity(p)) else 0.0
                for p in self.released()}

    def sensitivity(self, part: str) -> float:
        return 1.0 if part == "count" else float(getattr(self.clips, part))

    def ledger(self) -> Ledger:
        """What one factory's release costs: its parts and their composition."""
        sig = self.sigmas()
        return Ledger(tuple(Part(p, self.sensitivity(p), sig[p]) for p in self.released()))


# ----------------------------------------------------------------------------- blocks


def block_ids(grid: tuple[int, int], block: int | None) -> tuple[torch.Tensor, int]:
    """(L,) block index of every grid position (row-major) and the number of blocks: squares of
    `block` × `block` positions (the last row/column of blocks may be smaller); None = one block."""
    h, w = int(grid[0]), int(grid[1])
    if block is None:
        return torch.zeros(h * w, dtype=torch.long), 1
    rows, cols = -(-h // block), -(-w // block)
    r = torch.arange(h) // block
    c = torch.arange(w) // block
    return (r[:, None] * cols + c[None, :]).flatten(), rows * cols


def _averaging(ids: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, G) float64: column g averages the positions of block g."""
    onehot = torch.nn.functional.one_hot(ids, groups).to(torch.float64)
    return onehot / onehot.sum(0).clamp_min(1)


def _check_emb(emb: torch.Tensor, grid: tuple[int, int]) -> None:
    if emb.ndim != 3 or emb.shape[1] != grid[0] * grid[1]:
        raise ConfigError(f"embeddings {tuple(emb.shape)} do not fit the grid {tuple(grid)} (N, h·w, D)")
    if not bool(torch.isfinite(emb).all()):
        raise DataError("DP-PaDiM: embeddings contain NaN or infinite values")


def prepare(emb: torch.Tensor, indices: torch.Tensor, centre: str) -> torch.Tensor:
    """(N, L, D) -> (N, L, d) float64: the channel subset, centred per image when centre='image'
    (the same transform for training and query images)."""
    x = emb.index_select(-1, indices.to(emb.device)).to(torch.float64)
    return x - x.mean(dim=1, keepdim=True) if centre == "image" else x


def _clip(v: torch.Tensor, radius: float) -> tuple[torch.Tensor, int]:
    """Scale each image's statistic (first axis) down to norm `radius`; returns (clipped, count clipped)."""
    if math.isinf(radius):
        return v, 0
    norms = v.flatten(1).norm(dim=1)
    factor = torch.clamp(radius / norms.clamp_min(1e-300), max=1.0)
    return v * factor.reshape(-1, *([1] * (v.ndim - 1))), int((norms > radius).sum())


def per_image(x: torch.Tensor, grid: tuple[int, int], spec: DpPadimSpec) -> Iterable[dict[str, torch.Tensor]]:
    """The per-image statistics A (n, G_m, d), B (n, G_c, d, d), T (n, G_s) of centred x (n, L, d),
    a chunk of images at a time (unclipped)."""
    n, positions, dim = x.shape
    mean_avg = _averaging(*block_ids(grid, spec.mean_block))
    cov_ids, cov_groups = block_ids(grid, spec.cov_block)
    cov_avg = _averaging(cov_ids, cov_groups)
    scale_avg = _averaging(*block_ids(grid, spec.scale_block)) if spec.scale_block is not None else None
    per_row = (positions if cov_groups > 1 else 1) * dim * dim * 8  # the (L, d, d) products of one image
    step = max(1, CHUNK_BYTES // per_row)
    for start in range(0, n, step):
        xc = x[start:start + step]
        out = {"mean": torch.einsum("nld,lg->ngd", xc, mean_avg)}
        if cov_groups == 1:
            out["second"] = (torch.einsum("nli,nlj->nij", xc, xc) / positions).unsqueeze(1)
        else:
            products = xc.unsqueeze(-1) * xc.unsqueeze(-2)  # (n, L, d, d)
            out["second"] = torch.einsum("nlij,lg->ngij", products, cov_avg)
        if scale_avg is not None:
            out["scale"] = torch.einsum("nl,lg->ng", (xc * xc).sum(-1), scale_avg)
        yield out


# ----------------------------------------------------------------------------- one factory


@dataclass
class Release:
    """What one factory sends (noisy) and what it cost."""

    count: float | None  # None: not released (no mean released, so it changes no score)
    mean: torch.Tensor  # (G_m, d) Σ_i A_i + noise (zeros, not sent, when the mean is not released)
    second: torch.Tensor  # (G_c, d, d) Σ_i B_i + symmetric noise
    scale: torch.Tensor | None  # (G_s,) Σ_i T_i + noise
    ledger: Ledger
    clipped: dict[str, float] = field(default_factory=dict)  # fraction of images clipped, per part

    def __add__(self, other: "Release") -> "Release":
        if self.second.shape != other.second.shape or self.mean.shape != other.mean.shape:
            raise ConfigError("DP-PaDiM releases of different shapes cannot be added")
        scale = None if self.scale is None else self.scale + other.scale
        count = None if self.count is None or other.count is None else self.count + other.count
        return Release(count, self.mean + other.mean, self.second + other.second, scale,
                       self.ledger, {})


def symmetric_noise(groups: int, dim: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """(G, d, d) noise for a matrix released as [diag, sqrt(2)·upper triangle] with N(0, σ²) on each
    released coordinate: N(0, σ²) on the diagonal, N(0, σ²/2) off it, symmetric."""
    rows, cols = torch.triu_indices(dim, dim, offset=1)
    z = torch.zeros(groups, dim, dim, dtype=torch.float64)
    upper = torch.randn(groups, len(rows), generator=generator, dtype=torch.float64) * (sigma / math.sqrt(2.0))
    z[:, rows, cols] = upper
    z[:, cols, rows] = upper
    z.diagonal(dim1=1, dim2=2).copy_(torch.randn(groups, dim, generator=generator, dtype=torch.float64) * sigma)
    return z


def release(emb: torch.Tensor, grid: tuple[int, int], spec: DpPadimSpec, indices: torch.Tensor,
            generator: torch.Generator) -> Release:
    """One factory's noisy statistics of its training embeddings emb (n, L, D), n >= 0 images.
    `generator` must be a CPU generator; it draws all the noise."""
    if generator.device.type != "cpu":
        raise ValueError(f"release needs a CPU torch.Generator, got one on {generator.device}")
    if len(emb):
        _check_emb(emb, grid)
    x = prepare(emb, indices, spec.centre)
    dim = x.shape[-1]
    groups = {name: block_ids(grid, getattr(spec, f"{name}_block"))[1] for name in ("mean", "cov", "scale")}
    sums = {"mean": torch.zeros(groups["mean"], dim, dtype=torch.float64),
            "second": torch.zeros(groups["cov"], dim, dim, dtype=torch.float64),
            "scale": torch.zeros(groups["scale"], dtype=torch.float64)}
    clipped = {"mean": 0, "second": 0, "scale": 0}
    for stats in per_image(x, grid, spec):
        for name, value in stats.items():
            value, k = _clip(value, getattr(spec.clips, name))
            sums[name] += value.sum(0)
            clipped[name] += k
    sig = spec.sigmas()
    parts = spec.released()
    count = float(len(x)) if "count" in parts else None
    if count is not None and sig["count"] > 0:
        count += float(torch.randn((), generator=generator, dtype=torch.float64)) * sig["count"]
    if "mean" in parts:
        if sig["mean"] > 0:
            sums["mean"] += torch.randn(sums["mean"].shape, generator=generator, dtype=torch.float64) * sig["mean"]
    else:
        sums["mean"].zero_()
    if sig["second"] > 0:
        sums["second"] += symmetric_noise(groups["cov"], dim, sig["second"], generator)
    scale = None
    if "scale" in parts:
        scale = sums["scale"]
        if sig["scale"] > 0:
            scale = scale + torch.randn(scale.shape, generator=generator, dtype=torch.float64) * sig["scale"]
    n = max(1, len(x))
    return Release(count, sums["mean"], sums["second"], scale, spec.ledger(),
                   {k: v / n for k, v in clipped.items() if k in parts})


def aggregate(releases: Sequence[Release]) -> Release:
    """The server's statistics: the sum of the factories' noisy sums (post-processing)."""
    if not releases:
        raise DataError("no DP-PaDiM releases to aggregate")
    total = releases[0]
    for r in releases[1:]:
        total = total + r
    return total


# ----------------------------------------------------------------------------- the model


@dataclass(eq=False)
class DpPadim:
    """The server's model, built from summed releases (post-processing only)."""

    spec: DpPadimSpec
    indices: torch.Tensor
    grid: tuple[int, int]
    mean: torch.Tensor  # (L, d) per-position mean
    cov: torch.Tensor  # (G_c, d, d) one covariance per covariance block, floored and regularised
    precision: torch.Tensor  # (G_c, d, d) its inverse (from the same eigendecomposition)
    cov_ids: torch.Tensor  # (L,) the covariance block of each position
    ratio: torch.Tensor  # (L,) variance ratio of each position's scale block (1 without scales)
    count: float | None  # the noisy image count; None when it was not released
    config: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def from_release(cls, total: Release, spec: DpPadimSpec, indices: torch.Tensor, grid: tuple[int, int],
                     sites: int = 1, config: ModelConfig | None = None) -> "DpPadim":
        n = max(float(total.count), 2.0) if total.count is not None else NOMINAL_COUNT
        mean_ids, _ = block_ids(grid, spec.mean_block)
        cov_ids, cov_groups = block_ids(grid, spec.cov_block)
        mu = (total.mean / n)[mean_ids]  # (L, d)
        dim = mu.shape[1]
        outer_avg = torch.einsum("li,lj,lg->gij", mu, mu, _averaging(cov_ids, cov_groups))  # (G_c, d, d)
        cov = (total.second - n * outer_avg) / (n - 1.0)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        sigma = spec.sigmas()["second"]
        edge = math.sqrt(2.0 * dim) * sigma * math.sqrt(max(1, sites)) / (n - 1.0)
        evals, evecs = torch.linalg.eigh(cov)
        trace = evals.sum(-1).clamp_min(1e-12)  # (G_c,) before flooring: an unbiased-noise trace
        evals = evals.clamp_min(spec.floor * edge) + spec.eps
        if spec.floor == 0:
            evals = evals.clamp_min(spec.eps * 1e-3)  # PSD (an unfloored noisy estimate can be indefinite)
        cov = (evecs * evals.unsqueeze(1)) @ evecs.transpose(1, 2)
        precision = (evecs / evals.unsqueeze(1)) @ evecs.transpose(1, 2)
        ratio = torch.ones(grid[0] * grid[1], dtype=torch.float64)
        if total.scale is not None:
            scale_ids, scale_groups = block_ids(grid, spec.scale_block)
            avg = _averaging(scale_ids, scale_groups)
            spread = (total.scale - n * ((mu * mu).sum(-1) @ avg)) / (n - 1.0)  # (G_s,) E|x − μ|²
            # the trace of the covariance block each scale block lies in (scale blocks nest in cov blocks)
            owner = torch.zeros(scale_groups, dtype=torch.long)
            owner[scale_ids] = cov_ids
            raw = spread / trace[owner]
            # empirical Bayes: the noise on each ratio has a known std (σ_scale is public), so the
            # ratios are shrunk toward their mean by 1 − noise variance / observed variance
            noise_sd = spec.sigmas().get("scale", 0.0) * math.sqrt(max(1, sites)) / (n - 1.0) / trace[owner]
            if scale_groups > 1 and float(noise_sd.max()) > 0:
                centre = raw.mean()
                keep = max(0.0, 1.0 - float((noise_sd ** 2).mean()) / max(float(raw.var()), 1e-300))
                raw = centre + keep * (raw - centre)
            ratio = raw.clamp_min(MIN_SCALE)[scale_ids]
        return cls(spec, indices, (int(grid[0]), int(grid[1])), mu, cov, precision, cov_ids, ratio, total.count,
                   config or ModelConfig())

    @cached_property
    def gaussian(self) -> PadimGaussian:
        """The model as PaDiM's per-position Gaussian: mean (L, d), covariance (L, d, d)."""
        return PadimGaussian(self.mean, self.cov[self.cov_ids],
                             int(round(self.count)) if self.count is not None else 0, self.spec.eps)

    def _mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, d) -> (N, L): one matrix product per covariance block (the pooled case is one)."""
        if len(self.cov) == len(self.cov_ids):  # one covariance per position: PaDiM's batched form
            return mahalanobis(self.gaussian, x)
        out = torch.empty(x.shape[:2], dtype=torch.float64)
        for g in range(len(self.cov)):
            where = (self.cov_ids == g).nonzero().flatten()
            diff = x[:, where] - self.mean[where]
            out[:, where] = ((diff @ self.precision[g]) * diff).sum(-1).clamp_min(0).sqrt()
        return out

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (N, L, D) -> patch-score grids (N, h, w) float32."""
        _check_emb(emb, self.grid)
        x = prepare(emb, self.indices, self.spec.centre)
        dist = self._mahalanobis(x) / self.ratio.sqrt()
        return dist.float().reshape(len(emb), *self.grid)

    def score_embeddings(self, emb: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (N,) (max patch) and pixel maps (N, H, W), as PaDiM's."""
        return scores_from_patches(self.patch_scores(emb), size, self.config)


def channel_subset(total: int, spec: DpPadimSpec) -> torch.Tensor:
    """PaDiM's random channel subset, drawn from the spec's seed alone (data-independent)."""
    return select_dims(total, spec.dims, spec.seed)


def fit_federated(site_embs: Sequence[torch.Tensor], grid: tuple[int, int], spec: DpPadimSpec,
                  noise_seed: int, config: ModelConfig | None = None) -> tuple[DpPadim, list[Release]]:
    """Every factory releases its own noisy statistics (one generator each, from `noise_seed`),
    the server sums them and builds the model. One site = the centralized release."""
    if not site_embs:
        raise DataError("DP-PaDiM needs at least one factory")
    indices = channel_subset(int(site_embs[0].shape[-1]), spec)
    releases = [release(e, grid, spec, indices, torch.Generator().manual_seed(int(noise_seed) * 1009 + k))
                for k, e in enumerate(site_embs)]
    model = DpPadim.from_release(aggregate(releases), spec, indices, grid, sites=len(releases), config=config)
    return model, releases


def public_clips(public_emb: torch.Tensor, grid: tuple[int, int], spec: DpPadimSpec,
                 quantile: float = 0.5) -> Clips:
    """Clip radii measured on PUBLIC images' embeddings (N, L, D), never the factories': the
    `quantile` of the per-image norms of each statistic, under the spec's channels and blocks."""
    if not (0 < quantile <= 1):
        raise ConfigError(f"dp_padim: clip quantile must be in (0, 1], got {quantile}")
    _check_emb(public_emb, grid)
    x = prepare(public_emb, channel_subset(int(public_emb.shape[-1]), spec), spec.centre)
    norms: dict[str, list[torch.Tensor]] = {"mean": [], "second": [], "scale": []}
    for stats in per_image(x, grid, replace(spec, epsilon=math.inf, clips=Clips())):
        for name, value in stats.items():
            norms[name].append(value.flatten(1).norm(dim=1))
    radius = {k: float(torch.quantile(torch.cat(v), quantile)) if v else math.inf for k, v in norms.items()}
    return Clips(**{k: max(v, 1e-12) for k, v in radius.items()})
