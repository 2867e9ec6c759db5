"""Federated PaDiM: sites send sufficient statistics, the server's Gaussian is the centralized one.

A PaDiM Gaussian depends on the training images only through N, Σx and Σxxᵀ per position
(patchcore/padim.py), and these add up over disjoint image sets. So each site sends its
`PadimStats` once, the server sums them, and `aggregate(stats).gaussian()` equals the Gaussian a
centralized PaDiM fits on the union of the sites' images, up to float64 rounding of the sums
(measured on 12 real tire images, d = 100: mean identical, covariance within 1.1e-14). Unlike
PatchCore's coreset of coresets, nothing is approximated: no sampling, no budget, no dependence on
how images fall over sites.

What is sent, and the price: no patch vectors, only per-position moments. Each `outer` matrix is
symmetric, so only its upper triangle travels: L·d·(d+1)/2 float64 values, plus L·d sums and the
count. For L = 784 (28×28) and d = 100 that is 32.3 MB a site, whatever its number of images —
more than a PatchCore payload of a small site (10% of 784·N vectors of D fp16 values), less for
a large one. The sites must share the channel subset (same D, d and seed: `select_dims`) and the
grid. float64 is kept on the wire: float32 sums of squares would lose the exactness.

Flower-free: `encode_stats` gives bytes (safetensors, metadata: format, version, count, L, d),
`decode_stats` validates everything before the server trusts it and raises PayloadError with a
one-line reason.
"""

from __future__ import annotations

import json
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from federated.errors import PayloadError, QuorumError
from patchcore.padim import PadimStats

STATS_FORMAT = "fedpatch-padim-stats"
STATS_FORMAT_VERSION = 1


def site_stats(emb: torch.Tensor, indices: torch.Tensor | None = None) -> PadimStats:
    """A site's statistics of its own embeddings (N, L, D), on the shared channel subset
    `indices` (from `select_dims(D, d, seed)`; all channels when None)."""
    if indices is not None:
        emb = emb.index_select(-1, indices.to(emb.device))
    return PadimStats.from_embeddings(emb)


def upload_bytes(positions: int, dim: int) -> int:
    """Bytes of the arrays one site sends: sums (L, d) + upper triangles (L, d(d+1)/2), float64.
    The safetensors header adds a few hundred bytes on top."""
    return 8 * positions * dim + 8 * positions * (dim * (dim + 1) // 2)


def encode_stats(stats: PadimStats) -> bytes:
    """Statistics -> safetensors bytes, sending only the upper triangle of each `outer`."""
    rows, cols = torch.triu_indices(stats.dim, stats.dim)
    outer = stats.outer.detach().to("cpu", torch.float64)
    arrays = {"sums": stats.sums.detach().to("cpu", torch.float64).contiguous(),  # (L, d)
              "outer_triu": outer[:, rows, cols].contiguous()}  # (L, d(d+1)/2)
    meta = {"format": STATS_FORMAT, "format_version": str(STATS_FORMAT_VERSION),
            "count": str(int(stats.count)), "positions": str(stats.positions), "dim": str(stats.dim)}
    return save_bytes(arrays, metadata=meta)


def _header(data: bytes) -> dict[str, str]:
    """The safetensors metadata, read without touching the arrays."""
    if len(data) < 8:
        raise PayloadError(f"PaDiM statistics are truncated: {len(data)} bytes, not a safetensors buffer")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise PayloadError(f"PaDiM statistics are truncated: header of {size} bytes in a {len(data)}-byte buffer")
    try:
        header = json.loads(data[8:8 + size])
        meta = header.get("__metadata__", {})
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise PayloadError("PaDiM statistics have an unreadable safetensors header") from None
    if 8 + size + end > len(data):
        raise PayloadError(f"PaDiM statistics are truncated: {len(data)} bytes of {8 + size + end}")
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise PayloadError(f"not PaDiM statistics (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                           f"expected {STATS_FORMAT!r})")
    if meta.get("format_version") != str(STATS_FORMAT_VERSION):
        raise PayloadError(f"PaDiM statistics format version {meta.get('format_version')!r} is not "
                           f"supported (this server reads {STATS_FORMAT_VERSION})")
    return meta


def _meta_int(meta: dict[str, str], key: str, minimum: int) -> int:
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        raise PayloadError(f"PaDiM statistics metadata '{key}' is missing or not an integer: "
                           f"{meta.get(key)!r}") from None
    if value < minimum:
        raise PayloadError(f"PaDiM statistics metadata '{key}' must be >= {minimum}, got {value}")
    return value


def decode_stats(data: bytes, expect_L: int | None = None, expect_d: int | None = None) -> PadimStats:
    """Bytes from `encode_stats` -> statistics, or PayloadError naming what is wrong: truncation,
    another format, count < 1, shapes that disagree with the metadata or the expectation,
    non-finite values, or moments no real data can have (negative Σx², (Σx)² > N·Σx²)."""
    meta = _header(bytes(data))
    count, positions, dim = (_meta_int(meta, "count", 1), _meta_int(meta, "positions", 1),
                             _meta_int(meta, "dim", 1))
    for name, got, want in (("positions L", positions, expect_L), ("dims d", dim, expect_d)):
        if want is not None and got != want:
            raise PayloadError(f"PaDiM statistics have {name} = {got}, expected {want}")
    try:
        arrays = load_bytes(bytes(data))
    except (SafetensorError, ValueError) as exc:
        raise PayloadError(f"PaDiM statistics cannot be read: {str(exc).splitlines()[0][:200]}") from None
    sums, triu = arrays.get("sums"), arrays.get("outer_triu")
    for name, array, shape in (("sums", sums, (positions, dim)),
                               ("outer_triu", triu, (positions, dim * (dim + 1) // 2))):
        if array is None or tuple(array.shape) != shape or array.dtype != torch.float64:
            got = "missing" if array is None else f"{tuple(array.shape)} {array.dtype}"
            raise PayloadError(f"PaDiM statistics '{name}' must be {shape} float64, got {got}")
        if not bool(torch.isfinite(array).all()):
            raise PayloadError(f"PaDiM statistics '{name}' contain non-finite values (NaN/inf) in "
                               f"{int((~torch.isfinite(array)).sum())} of {array.numel()} entries")
    stats = PadimStats(count, sums, _unpack(triu, dim))
    _check_moments(stats)
    return stats


def _unpack(triu: torch.Tensor, dim: int) -> torch.Tensor:
    """(L, d(d+1)/2) upper triangles -> (L, d, d) symmetric matrices."""
    rows, cols = torch.triu_indices(dim, dim)
    outer = torch.zeros(triu.shape[0], dim, dim, dtype=triu.dtype)
    outer[:, rows, cols] = triu
    outer[:, cols, rows] = triu
    return outer


def _check_moments(stats: PadimStats) -> None:
    """Σx² >= 0 and Cauchy–Schwarz (Σx)² <= N·Σx² for every position and channel (with float
    slack): statistics that break them were not computed from any images."""
    squares = stats.outer.diagonal(dim1=1, dim2=2)  # (L, d)
    if bool((squares < 0).any()):
        raise PayloadError("PaDiM statistics have negative sums of squares: not computed from data")
    slack = 1e-9 * stats.count * squares + 1e-12
    if bool((stats.sums ** 2 > stats.count * squares + slack).any()):
        raise PayloadError(f"PaDiM statistics violate (Σx)² <= N·Σx² for count {stats.count}: "
                           f"the count or the sums are wrong")


def aggregate(parts: Iterable[PadimStats]) -> PadimStats:
    """The server's statistics: the exact sum of the sites'. Its `.gaussian()` is the
    centralized Gaussian of all the sites' images."""
    parts = list(parts)
    if not parts:
        raise QuorumError("no site delivered PaDiM statistics: nothing to aggregate")
    return PadimStats.merge(parts)
