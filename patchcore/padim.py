"""PaDiM (Defard et al., 2021): one multivariate Gaussian per patch position, Mahalanobis scores.

PaDiM models the normal patches at grid position l (of L = h·w) by a Gaussian N(μ_l, Σ_l) fitted
on the training images' embeddings at that position, and scores a test patch by its Mahalanobis
distance to that Gaussian. Like the official code: Σ_l is the unbiased sample covariance plus
0.01·I (regularised so it is always invertible), the score is the square root of the quadratic
form (scipy's `mahalanobis`), and a random subset of d embedding channels is kept (the paper:
d = 100 for ResNet18, 550 for WRN50) to keep the L covariance matrices (L, d, d) affordable.

Why sufficient statistics: the Gaussian depends on the training images only through
N, Σx (L, d) and Σxxᵀ (L, d, d). `PadimStats` holds exactly these, in float64, and two sets of
statistics add up; so statistics computed on disjoint shards of images and summed give the very
Gaussian the union of the shards gives (federated/padim.py sends them from each site). Covariance
from raw moments, (Σxxᵀ − N·μμᵀ)/(N − 1), loses digits to cancellation only when |μ|² dwarfs the
variance; in float64 with patch embeddings of magnitude ~1-10 it agrees with numpy's two-pass
np.cov to ~1e-12 (tested).

Deviations from the paper, on purpose:
- PaDiM runs on fedpatch's patch embeddings (the backbone's layer2 + layer3 features with the
  3×3 local averaging PatchCore uses, patchcore/features.py) instead of the paper's raw
  layer1-3 concatenation. Both methods then see the same features, so a comparison isolates the
  memory model: a per-position Gaussian against a nearest-neighbour coreset bank.
- The random channel subset defaults to d = 100 of the embedding's D channels, drawn by a torch
  generator from `seed` (the official code uses Python's `random.sample` with seed 1024), sorted.
- Scores are not min-max normalised over the test set (the official script does, for display):
  normalisation changes no AUROC and would make a score depend on the other test images.
Image score = max of the patch scores, pixel maps = bilinear upsampling + Gaussian σ = 4, as
PatchCore's (`patchcore.model.scores_from_patches`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from patchcore import strict_json
from patchcore.config import ModelConfig, build, to_dict
from patchcore.errors import BankFormatError, ConfigError, DataError
from patchcore.memory_bank import atomic_write_bytes, bank_paths, read_described
from patchcore.model import scores_from_patches

PADIM_FORMAT_VERSION = 1
DEFAULT_DIMS = 100  # the paper's d for ResNet18
DEFAULT_EPS = 0.01  # the official code's covariance regulariser
CHUNK_BYTES = 64 << 20  # float64 working set per chunk of images (statistics and scoring)


def _chunk_rows(per_row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, per_row_bytes))


@dataclass(eq=False)
class PadimStats:
    """Sufficient statistics of N images' embeddings at L positions in d dims (all float64)."""

    count: int  # N, the number of images
    sums: torch.Tensor  # (L, d): Σ_n x_nl
    outer: torch.Tensor  # (L, d, d): Σ_n x_nl x_nlᵀ (symmetric)

    @property
    def positions(self) -> int:
        return int(self.sums.shape[0])

    @property
    def dim(self) -> int:
        return int(self.sums.shape[1])

    @classmethod
    def from_embeddings(cls, emb: torch.Tensor) -> "PadimStats":
        """emb (N, L, d) -> statistics, accumulated in float64 a chunk of images at a time so the
        float64 copy never exceeds CHUNK_BYTES (plus the (L, d, d) result)."""
        if emb.ndim != 3 or emb.shape[0] == 0:
            raise DataError(f"PaDiM needs embeddings (N, L, d) with N >= 1, got {tuple(emb.shape)}")
        n, positions, dim = emb.shape
        sums = torch.zeros(positions, dim, dtype=torch.float64, device=emb.device)
        outer = torch.zeros(positions, dim, dim, dtype=torch.float64, device=emb.device)
        step = _chunk_rows(positions * dim * 8)
        for start in range(0, n, step):
            x = emb[start:start + step].to(torch.float64).transpose(0, 1)  # (L, n, d)
            sums += x.sum(dim=1)
            outer.baddbmm_(x.transpose(1, 2), x)  # (L, d, n) @ (L, n, d)
        return cls(int(n), sums, outer)

    def _check_compatible(self, other: "PadimStats") -> None:
        if self.sums.shape != other.sums.shape or self.outer.shape != other.outer.shape:
            raise ConfigError(
                f"PaDiM statistics of different shapes cannot be merged: (L, d) = "
                f"{tuple(self.sums.shape)} vs {tuple(other.sums.shape)} (same backbone, crop and "
                f"dims subset needed)")

    def __add__(self, other: "PadimStats") -> "PadimStats":
        """Statistics of the union of both image sets (exact: sums of sums)."""
        if not isinstance(other, PadimStats):
            return NotImplemented
        self._check_compatible(other)
        return PadimStats(self.count + other.count, self.sums + other.sums.to(self.sums.device),
                          self.outer + other.outer.to(self.outer.device))

    @staticmethod
    def merge(parts: Iterable["PadimStats"]) -> "PadimStats":
        """The sum of any number of statistics (at least one)."""
        parts = list(parts)
        if not parts:
            raise DataError("no PaDiM statistics to merge (an empty list)")
        total = PadimStats(parts[0].count, parts[0].sums.clone(), parts[0].outer.clone())
        for part in parts[1:]:
            total._check_compatible(part)
            total.count += part.count
            total.sums += part.sums.to(total.sums.device)
            total.outer += part.outer.to(total.outer.device)
        return total

    def gaussian(self, eps: float = DEFAULT_EPS) -> "PadimGaussian":
        """Mean (L, d) and unbiased covariance + eps·I (L, d, d); needs N >= 2 images."""
        if self.count < 2:
            raise DataError(f"PaDiM needs at least 2 training images for a covariance, got {self.count}")
        if not eps >= 0:
            raise ConfigError(f"PaDiM covariance regulariser eps must be >= 0, got {eps}")
        n = float(self.count)
        mean = self.sums / n  # (L, d)
        cov = (self.outer - n * mean.unsqueeze(2) * mean.unsqueeze(1)) / (n - 1)  # (L, d, d)
        cov = 0.5 * (cov + cov.transpose(1, 2))  # exact symmetry despite rounding
        cov.diagonal(dim1=1, dim2=2).add_(eps)
        return PadimGaussian(mean, cov, self.count, eps)


@dataclass(eq=False)
class PadimGaussian:
    """One Gaussian per position: mean (L, d), covariance (L, d, d), float64."""

    mean: torch.Tensor  # (L, d)
    cov: torch.Tensor  # (L, d, d), regularised
    count: int
    eps: float = DEFAULT_EPS

    @cached_property
    def precision(self) -> torch.Tensor:
        """Σ⁻¹ (L, d, d) through the Cholesky factor: stable, and exactly symmetric."""
        chol, info = torch.linalg.cholesky_ex(self.cov)
        if bool((info != 0).any()):
            bad = int((info != 0).sum())
            raise DataError(f"{bad} of {len(self.cov)} PaDiM covariances are not positive definite "
                            f"(non-finite embeddings, or eps = {self.eps} too small)")
        return torch.cholesky_inverse(chol)


def select_dims(total: int, dims: int | None, seed: int = 0) -> torch.Tensor:
    """PaDiM's random channel subset: `dims` sorted indices of range(total), deterministic in
    `seed`; all channels when `dims` is None or >= total."""
    if total < 1:
        raise ConfigError(f"embedding dimension must be >= 1, got {total}")
    if dims is None or dims >= total:
        return torch.arange(total)
    if dims < 1:
        raise ConfigError(f"PaDiM dims must be >= 1 (or null for all), got {dims}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=generator)[:dims].sort().values


def mahalanobis(gaussian: PadimGaussian, emb: torch.Tensor) -> torch.Tensor:
    """emb (N, L, d) -> Mahalanobis distances (N, L), float64: sqrt((x − μ)ᵀ Σ⁻¹ (x − μ)) per
    position, a chunk of images at a time."""
    mean, precision = gaussian.mean, gaussian.precision
    if emb.ndim != 3 or tuple(emb.shape[1:]) != tuple(mean.shape):
        raise ConfigError(f"embeddings {tuple(emb.shape)} do not fit the PaDiM Gaussian "
                          f"(N, L, d) = (N, {mean.shape[0]}, {mean.shape[1]})")
    positions, dim = mean.shape
    out = torch.empty(emb.shape[0], positions, dtype=torch.float64, device=mean.device)
    step = _chunk_rows(2 * positions * dim * 8)
    for start in range(0, emb.shape[0], step):
        diff = (emb[start:start + step].to(mean.device, torch.float64) - mean).transpose(0, 1)  # (L, n, d)
        form = (torch.bmm(diff, precision) * diff).sum(dim=2)  # (L, n)
        out[start:start + step] = form.clamp_min(0).sqrt().transpose(0, 1)
    return out


@dataclass(eq=False)
class Padim:
    """The method on patch embeddings: fit a Gaussian per position, score by Mahalanobis distance.

    `stats` are kept (not only the Gaussian) so a fitted model can absorb more images or sites."""

    config: ModelConfig = field(default_factory=ModelConfig)
    dims: int | None = DEFAULT_DIMS
    seed: int = 0
    eps: float = DEFAULT_EPS
    indices: torch.Tensor | None = None  # (d,) the chosen channels of the D-dim embedding
    grid: tuple[int, int] | None = None
    stats: PadimStats | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def select(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> (N, L, d): the channel subset, drawn on first use from (D, dims, seed)."""
        if self.indices is None:
            self.indices = select_dims(int(emb.shape[-1]), self.dims, self.seed)
        if int(self.indices.max()) >= emb.shape[-1]:
            raise ConfigError(f"embeddings have {emb.shape[-1]} channels; the PaDiM model picks channel "
                              f"{int(self.indices.max())} (another backbone, layers or projection?)")
        return emb.index_select(-1, self.indices.to(emb.device))

    def fit_embeddings(self, emb: torch.Tensor, grid: tuple[int, int]) -> "Padim":
        """emb (N, L, D) of N >= 2 training images on `grid` (h, w), h·w = L."""
        return self.set_stats(PadimStats.from_embeddings(self.select(emb)), _check_grid(emb, grid))

    def set_stats(self, stats: PadimStats, grid: tuple[int, int]) -> "Padim":
        """Install statistics (e.g. a federation's aggregate) computed on `self.indices`."""
        if stats.positions != grid[0] * grid[1]:
            raise ConfigError(f"PaDiM statistics have {stats.positions} positions; grid {grid} has {grid[0] * grid[1]}")
        self.stats, self.grid = stats, (int(grid[0]), int(grid[1]))
        self.__dict__.pop("gaussian", None)  # refit from the new statistics
        return self

    @cached_property
    def gaussian(self) -> PadimGaussian:
        if self.stats is None:
            raise ConfigError("the PaDiM model is not fitted: call fit_embeddings or load one")
        return self.stats.gaussian(self.eps)

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (N, L, D) -> patch-score grids (N, h, w), float32."""
        grid = _check_grid(emb, self.grid)
        return mahalanobis(self.gaussian, self.select(emb)).float().reshape(len(emb), *grid)

    def score_embeddings(self, emb: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (N, L, D) -> image scores (N,) (max patch) and pixel maps (N, H, W) at `size`."""
        return scores_from_patches(self.patch_scores(emb), size, self.config)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """`<path>.safetensors` (stats + indices) and `<path>.json` (settings, sha256)."""
        if self.stats is None or self.indices is None or self.grid is None:
            raise ConfigError("an unfitted PaDiM model cannot be saved")
        tensor_path, meta_path = bank_paths(path)
        blob = save_bytes({"sums": self.stats.sums.cpu().contiguous(), "outer": self.stats.outer.cpu().contiguous(),
                           "indices": self.indices.to(torch.int64).cpu().contiguous()},
                          metadata={"format": "fedpatch-padim"})
        meta = {"format": "fedpatch-padim", "format_version": PADIM_FORMAT_VERSION,
                "count": self.stats.count, "positions": self.stats.positions, "dim": self.stats.dim,
                "grid": list(self.grid), "dims": self.dims, "seed": self.seed, "eps": self.eps,
                "sha256": hashlib.sha256(blob).hexdigest(), "model": to_dict(self.config),
                "metadata": self.metadata}
        atomic_write_bytes(tensor_path, blob)
        atomic_write_bytes(meta_path, strict_json.dumps(meta).encode())
        return tensor_path, meta_path

    @classmethod
    def load(cls, path: str | Path) -> "Padim":
        """Read and verify a model written by `save` (safetensors + JSON only, never pickle)."""
        tensor_path, meta_path = bank_paths(path)
        meta, blob = _read_verified(tensor_path, meta_path)
        try:
            tensors = load_bytes(blob)
        except (SafetensorError, ValueError) as exc:
            raise BankFormatError(f"cannot read {tensor_path}: {str(exc).splitlines()[0][:200]}") from None
        positions, dim, count, grid = (meta.get(k) for k in ("positions", "dim", "count", "grid"))
        if not isinstance(count, int) or not isinstance(grid, list) or len(grid) != 2:
            raise BankFormatError(f"{meta_path} lacks an integer 'count' or a (h, w) 'grid'")
        sums, outer, indices = tensors.get("sums"), tensors.get("outer"), tensors.get("indices")
        if sums is None or outer is None or indices is None or list(sums.shape) != [positions, dim] \
                or list(outer.shape) != [positions, dim, dim] or list(indices.shape) != [dim]:
            raise BankFormatError(f"{tensor_path} does not hold the sums/outer/indices its JSON describes")
        model = cls(build(ModelConfig, meta.get("model", {}), "model"), dims=meta.get("dims"),
                    seed=int(meta.get("seed", 0)), eps=float(meta.get("eps", DEFAULT_EPS)),
                    indices=indices, metadata=meta.get("metadata", {}))
        return model.set_stats(PadimStats(count, sums, outer), (int(grid[0]), int(grid[1])))


def _check_grid(emb: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        raise ConfigError("the PaDiM model is not fitted: call fit_embeddings or load one")
    if emb.ndim != 3 or emb.shape[1] != grid[0] * grid[1]:
        raise ConfigError(f"embeddings {tuple(emb.shape)} do not fit the grid {tuple(grid)}: "
                          f"expected (N, {grid[0] * grid[1]}, D)")
    return int(grid[0]), int(grid[1])


def _read_verified(tensor_path: Path, meta_path: Path) -> tuple[dict[str, Any], bytes]:
    """(JSON description, safetensors bytes) after the format, version and checksum checks."""
    meta = read_described(tensor_path, meta_path, ("PaDiM model", "models", "PaDiM model"), "fedpatch-padim",
                          PADIM_FORMAT_VERSION)
    return meta, tensor_path.read_bytes()
