"""Optional maps applied to every patch embedding, before the bank and before scoring.

Two maps, both off by default (PatchCore as published uses neither):

- a shared Gaussian random projection R (D, d), entries N(0, 1/d), drawn on the CPU from
  `projection_seed` so every process that knows the seed builds the same matrix. A factory sends
  d-dimensional vectors instead of D-dimensional ones (less to upload); the scorer projects its
  queries with the same R. Johnson–Lindenstrauss: squared distances are preserved in expectation.
- per-vector L2 clipping to `clip_norm` (rows longer than the norm are scaled down to it). It
  bounds what one released vector can reveal, which differential privacy needs
  (federated/privacy.py). Applied to training and query vectors alike, so the bank and the
  queries live in the same space, and a centralized run with the same config clips as the
  federated one does.

Order: project, then clip (the clip bounds the vectors that are actually released).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchcore.errors import ConfigError


def clip_rows(x: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """(x with every row of L2 norm > clip_norm scaled to exactly clip_norm, fraction clipped).

    x (n, D); rows at or under the norm (zero rows included) are returned unchanged.
    """
    if not clip_norm > 0:
        raise ConfigError(f"clip norm must be > 0, got {clip_norm}")
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (n, 1)
    scale = torch.clamp(clip_norm / norms, max=1.0)  # zero rows: inf -> 1, no NaN
    fraction = float((norms > clip_norm).float().mean()) if x.shape[0] else 0.0
    return x * scale, fraction


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """(in_dim, out_dim) float32 with N(0, 1/out_dim) entries, identical on every machine."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim ** 0.5


@dataclass(frozen=True)
class FeatureTransform:
    """Project (optional) then clip (optional) patch embeddings (n, in_dim) -> (n, out_dim)."""

    in_dim: int
    projection_dim: int | None = None
    projection_seed: int = 0
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.projection_dim is not None and not 1 <= self.projection_dim <= self.in_dim:
            raise ConfigError(f"model.transform.projection_dim must be in [1, {self.in_dim}] "
                              f"(the embedding size), got {self.projection_dim}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"model.transform.clip_norm must be > 0, got {self.clip_norm}")

    @property
    def identity(self) -> bool:
        return self.projection_dim is None and self.clip_norm is None

    @property
    def out_dim(self) -> int:
        return self.projection_dim or self.in_dim

    def tag(self) -> str:
        """A suffix for the feature-space id: payloads and banks match only with equal tags."""
        parts = []
        if self.projection_dim is not None:
            parts.append(f"rp{self.projection_dim}s{self.projection_seed}")
        if self.clip_norm is not None:
            parts.append(f"clip{self.clip_norm:g}")
        return ":".join(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, in_dim) -> (n, out_dim) on x's device."""
        if self.projection_dim is not None:
            x = x @ self._matrix(x.device)
        if self.clip_norm is not None:
            x, _ = clip_rows(x, self.clip_norm)
        return x

    def _matrix(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_cache", {})  # frozen dataclass: a private memo
        if device not in cache:
            cache[device] = projection_matrix(self.in_dim, self.projection_dim, self.projection_seed).to(device)
        return cache[device]
