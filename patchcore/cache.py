"""An on-disk cache of patch embeddings, so sweeps never extract the same image twice.

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
entry is a miss: recomputed, rewritten, with a warning. The federation gives each factory its own
folder (`cache_dir/<factory>`), as each factory would keep its own disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fedpatch.cache")
FORMAT = "fedpatch-feature-cache/1"
_UNSTABLE_REPR = " at 0x"  # default object reprs carry a memory address: not a content key


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


@dataclass
class FeatureCache:
    """A folder of cached patch embeddings; `stats` counts what this object saw."""

    root: Path
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    @classmethod
    def under(cls, cache_dir: str | Path | None, name: str) -> "FeatureCache | None":
        """The cache folder `cache_dir/name` (a factory's, or "central"), None when caching is off."""
        return cls(Path(cache_dir) / name) if cache_dir else None

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
        except Exception as exc:  # truncated file, foreign file, bad header ...
            log.warning("feature cache entry %s is unreadable (%s): recomputing it", path,
                        str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return features, grid  # type: ignore[return-value]

    def store(self, namespace: str, key: str, features: torch.Tensor, grid: tuple[int, int]) -> None:
        """Write one entry atomically (temporary file + rename)."""
        from safetensors.torch import save_file

        path = self.path(namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = features.detach().to("cpu", torch.float32).contiguous()  # (L, D)
        meta = {"key": key, "grid": f"{grid[0]},{grid[1]}", "format": FORMAT}
        _atomic_write(path, lambda p: save_file({"features": tensor}, p, metadata=meta))


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
