"""An on-disk cache of patch embeddings, so sweeps never extract the same image twice.

Where: `data.cache_dir` (off when empty), one folder per owner: `central` for the centralized
model and each factory's own `<factory>` (as each factory would keep its own disk), then one
folder per feature setting (20 hex chars, with its settings.json), then `<2 hex>/<key>.safetensors`.
Size: L × D × 4 bytes an image (L patches of D float32): ~3.2 MB at the paper's settings
(WideResNet-50-2, 224 crop: 28 × 28 patches × 1024).
Cap: `data.cache_max_gb` (default 20; 0 = no cap) bounds the whole `data.cache_dir`: after a write
takes it past the cap, the least recently used entries (a hit touches its file's mtime) are
deleted until it is back under 90% of the cap; the first eviction logs one warning saying how
much went (later ones are counted in `stats`).
Clearing: delete the folder (or any part of it) at any time; a missing entry is only a miss.

One entry per (image content, feature settings): the key is the sha256 of
- the image file's bytes (not its path: a copied or renamed file still hits, an edited one misses),
- the record's domain shift (its full parameter repr; a shift without a stable repr is not cached),
- a namespace naming everything else that changes the numbers: backbone id (backbone, layers,
  patch size, embedding size, projection/clipping), weights (for a local file, its sha256; for
  "none", the seed), embedding dims, backbone precision, and the preprocessing (resize, crop,
  mean, std).

An entry is a safetensors file (never a pickle) holding "features" (L, D) float32 exactly as
extracted, with the patch grid and the key in its metadata; it is written to a temporary file and
renamed (atomic on POSIX), so a crashed writer leaves no half entry. An unreadable or mismatching
entry is a miss: recomputed, rewritten, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from patchcore.config import DataConfig

log = logging.getLogger("fedpatch.cache")
FORMAT = "fedpatch-feature-cache/1"
_UNSTABLE_REPR = " at 0x"  # default object reprs carry a memory address: not a content key
ENTRY_SUFFIX = ".safetensors"
LOW_WATER = 0.9  # eviction goes down to this share of the cap, so it runs rarely, not every write


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_WEIGHTS_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_identity(weights: str, seed: int) -> str:
    """"imagenet", "none:seed=S" (random init depends on the seed), or "sha256:<file digest>"."""
    if weights == "imagenet":
        return weights
    if weights == "none":
        return f"none:seed={seed}"
    stat = os.stat(weights)
    memo = (str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _WEIGHTS_DIGESTS:
        _WEIGHTS_DIGESTS[memo] = sha256_file(weights)
    return "sha256:" + _WEIGHTS_DIGESTS[memo]


def shift_identity(shift: Any) -> str | None:
    """A stable text for a domain shift (None -> "none"); None when it has no stable repr."""
    if shift is None:
        return "none"
    text = f"{type(shift).__module__}.{type(shift).__qualname__}:{shift!r}"
    return None if _UNSTABLE_REPR in text else text


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    uncacheable: int = 0
    evicted: int = 0  # entries deleted to keep under data.cache_max_gb
    evicted_bytes: int = 0


@dataclass
class FeatureCache:
    """A folder of cached patch embeddings; `stats` counts what this object saw.

    `max_bytes` > 0 caps the size of `budget_root` (default: `root`), the folder shared by every
    cache of one `data.cache_dir`; entries past it are evicted least recently used first."""

    root: Path
    stats: CacheStats = field(default_factory=CacheStats)
    max_bytes: int = 0
    budget_root: Path | None = None
    _used: int | None = field(default=None, init=False, repr=False)  # bytes under budget_root: measured + written since

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        self.budget_root = Path(self.budget_root).expanduser() if self.budget_root else self.root

    @classmethod
    def under(cls, data: DataConfig, name: str) -> "FeatureCache | None":
        """The cache folder `data.cache_dir/name` (a factory's, or "central") capped at
        `data.cache_max_gb` for the whole cache_dir; None when caching is off."""
        if not data.cache_dir:
            return None
        return cls(Path(data.cache_dir) / name, max_bytes=int(data.cache_max_gb * 1e9),
                   budget_root=Path(data.cache_dir))

    def namespace(self, settings: dict[str, Any]) -> str:
        """The folder of one feature setting (sha256 of its JSON); writes settings.json once."""
        text = json.dumps({"format": FORMAT, **settings}, sort_keys=True)
        name = hashlib.sha256(text.encode()).hexdigest()[:20]
        folder = self.root / name
        if not (folder / "settings.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(folder / "settings.json", lambda p: Path(p).write_text(text + "\n"))
        return name

    def key(self, namespace: str, image_path: str | Path, shift: Any) -> str | None:
        """The entry key of one image under one namespace; None when it cannot be cached."""
        shift_text = shift_identity(shift)
        if shift_text is None:
            self.stats.uncacheable += 1
            return None
        text = "\n".join((namespace, sha256_file(image_path), shift_text))
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, namespace: str, key: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.safetensors"

    def load(self, namespace: str, key: str) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(features (L, D) float32 on the CPU, grid) or None for a miss (corrupt: warned)."""
        path = self.path(namespace, key)
        if not path.is_file():
            self.stats.misses += 1
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                features = handle.get_tensor("features")
            grid = tuple(int(v) for v in meta["grid"].split(","))
            if meta.get("key") != key or features.ndim != 2 or len(grid) != 2 or grid[0] * grid[1] != len(features):
                raise ValueError("entry does not match its key or grid")
        except FileNotFoundError:  # evicted (or cleared) by another process since is_file()
            self.stats.misses += 1
            return None
        except Exception as exc:  # truncated file, foreign file, bad header ...
            log.warning("feature cache entry %s is unreadable (%s): recomputing it", path,
                        str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        _touch(path)  # recently used: the last to be evicted
        return features, grid  # type: ignore[return-value]

    def store(self, namespace: str, key: str, features: torch.Tensor, grid: tuple[int, int]) -> None:
        """Write one entry atomically (temporary file + rename)."""
        from safetensors.torch import save_file

        path = self.path(namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = features.detach().to("cpu", torch.float32).contiguous()  # (L, D)
        meta = {"key": key, "grid": f"{grid[0]},{grid[1]}", "format": FORMAT}
        _atomic_write(path, lambda p: save_file({"features": tensor}, p, metadata=meta))
        if self.max_bytes > 0:
            self._used = (_folder_bytes(self.budget_root) if self._used is None
                          else self._used + _size(path))
            if self._used > self.max_bytes:
                self.evict()

    def evict(self) -> int:
        """Delete least recently used entries under `budget_root` until it holds at most
        LOW_WATER × max_bytes; returns the bytes freed. The first eviction of this cache logs one
        warning; later ones are only counted (stats.evicted, stats.evicted_bytes)."""
        entries, total = [], 0
        for path in _files(self.budget_root):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            total += stat.st_size
            if path.name.endswith(ENTRY_SUFFIX):
                entries.append((stat.st_mtime, stat.st_size, path))
        target, freed, count = int(LOW_WATER * self.max_bytes), 0, 0
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total - freed <= target:
                break
            path.unlink(missing_ok=True)
            freed, count = freed + size, count + 1
        self._used = total - freed
        if count and not self.stats.evicted:
            log.warning("feature cache %s over its cap of %.3g GB (data.cache_max_gb): evicted %d least "
                        "recently used entries, %.3g GB (further evictions are not logged)",
                        self.budget_root, self.max_bytes / 1e9, count, freed / 1e9)
        self.stats.evicted += count
        self.stats.evicted_bytes += freed
        return freed


def _touch(path: Path) -> None:
    try:
        now = time.time()
        os.utime(path, (now, now))
    except OSError:  # a read-only cache still serves hits
        pass


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield Path(dirpath) / name


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # evicted by another process meanwhile
        return 0


def _folder_bytes(root: Path) -> int:
    return sum(_size(path) for path in _files(root))


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
