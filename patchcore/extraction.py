"""Extraction of a loader's patch embeddings: into memory, into a preallocated (memory-mapped)
array, and through the on-disk feature cache.

`extract_features` is what `PatchCore.extract` runs. Without a cache it embeds batch after batch;
with one (and a loader over an `ImageDataset`, whose records and preprocessing name every image)
it looks every image up first and runs the backbone only on the misses, in one loader over those
images (same batch size and workers), merging hits and fresh rows back in record order. With
`out` the rows are written into that (N·L, D) array as they come, so a shard whose features do
not fit in memory streams into an `np.memmap` (see `open_store`), and only one batch is in RAM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from patchcore.cache import FeatureCache, weights_identity
from patchcore.data.dataset import ImageDataset, make_loader
from patchcore.errors import ConfigError
from patchcore.progress import track


def _images(batch: Any) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch


def cache_settings(model: Any, dataset: ImageDataset) -> dict[str, Any]:
    """Everything besides the image and its shift that changes the embeddings."""
    c, pre = model.config, dataset.preprocess
    # the id of the raw embeddings: entries are kept before model.transform (clip, projection),
    # so one entry serves every transform (ids without a transform are unchanged)
    return {"backbone_id": getattr(model, "raw_backbone_id", model.backbone_id),
            "weights": weights_identity(c.backbone.weights, model.seed),
            "pretrain_embed_dim": c.pretrain_embed_dim, "precision": getattr(c, "precision", "float32"),
            "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": pre.mean, "std": pre.std,
                           "resampler": "pil-bilinear"}}  # entries of the earlier tensor resize miss


class _Sink:
    """Collects (L, D) row blocks in order: into `out` when given, else into a list."""

    def __init__(self, out: np.ndarray | torch.Tensor | None) -> None:
        self.out, self.offset, self.parts = out, 0, []

    def add(self, rows: torch.Tensor) -> None:
        if self.out is None:
            self.parts.append(rows)
            return
        end = self.offset + len(rows)
        if end > len(self.out):
            raise ConfigError(f"the output array has {len(self.out)} rows; the images give more")
        if isinstance(self.out, np.ndarray):
            self.out[self.offset:end] = rows.detach().cpu().numpy().astype(self.out.dtype, copy=False)
        else:
            self.out[self.offset:end] = rows.to(self.out.device, self.out.dtype)
        self.offset = end

    def result(self, device: torch.device) -> torch.Tensor:
        if self.out is None:
            if not self.parts:
                raise ConfigError("no training images to fit on")
            return torch.cat(self.parts).to(device)
        if self.offset != len(self.out):
            raise ConfigError(f"the output array has {len(self.out)} rows; the images gave {self.offset}")
        if isinstance(self.out, np.memmap):
            self.out.flush()
        return torch.from_numpy(self.out) if isinstance(self.out, np.ndarray) else self.out


def extract_features(model: Any, loader: Iterable[Any], progress: bool = True, desc: str = "extract",
                     out: np.ndarray | torch.Tensor | None = None,
                     cache: FeatureCache | None = None) -> torch.Tensor:
    """All patch embeddings of a loader's images, (N·L, D), in loader order.

    Returns a float32 tensor on the model's device, or, with `out`, `out` itself (a numpy array,
    memory maps included, comes back as a tensor sharing its memory)."""
    sink = _Sink(out)
    dataset = getattr(loader, "dataset", None)
    if cache is not None and isinstance(dataset, ImageDataset):
        _extract_cached(model, loader, dataset, cache, sink, progress, desc)
    else:
        for batch in track(loader, desc, progress):
            sink.add(model.embed(_images(batch))[0].flatten(0, 1))  # (B·L, D)
    return sink.result(model.device)


def _extract_cached(model: Any, loader: Any, dataset: ImageDataset, cache: FeatureCache,
                    sink: _Sink, progress: bool, desc: str) -> None:
    namespace = cache.namespace(cache_settings(model, dataset))
    keys = [cache.key(namespace, r.path, dataset.shift_for(r)) for r in dataset.records]
    found = [cache.load(namespace, k) if k is not None else None for k in keys]
    missing = [i for i, hit in enumerate(found) if hit is None]
    fresh = _embed_each(model, loader, dataset, missing, progress, desc)
    for i, hit in enumerate(found):
        if hit is None:
            rows, grid = next(fresh)  # (L, D) raw, on the device
            if keys[i] is not None:
                cache.store(namespace, keys[i], rows, grid)
        else:
            rows = hit[0].to(model.device)
        sink.add(rows if model.transform.identity else model.transform(rows))


def _embed_each(model: Any, loader: Any, dataset: ImageDataset, indices: list[int],
                progress: bool, desc: str) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """(L, D) embeddings and grid of dataset[i] for i in `indices`, in order, batch by batch."""
    if not indices:
        return
    subset = Subset(dataset, indices)
    batches = make_loader(subset, getattr(loader, "batch_size", None) or 1, getattr(loader, "num_workers", 0))
    for batch in track(batches, f"{desc} ({len(indices)} not cached)", progress):
        emb, grid = model.embed_raw(_images(batch))  # (B, L, D) before model.transform
        for rows in emb:
            yield rows, grid


def open_store(path: str | Path, rows: int, dim: int, dtype: str = "float16") -> np.memmap:
    """A preallocated (rows, dim) `.npy` memory map at `path` for `extract(..., out=...)`; the
    file is a standard .npy (np.load(path, mmap_mode="r") reopens it)."""
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"a feature store holds float16 or float32, got {dtype!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(str(path), mode="w+", dtype=dtype, shape=(int(rows), int(dim)))


def rows_per_image(model: Any, dataset: ImageDataset) -> int:
    """L: patches per image at this dataset's preprocessing (one image embedded to find out);
    with (rows_per_image × len(dataset), D) a store can be allocated before extraction."""
    image = dataset[0]["image"][None]  # (1, 3, H, W)
    emb, _ = model.embed(image)
    return int(emb.shape[1])
