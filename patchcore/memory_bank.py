"""The memory bank: coreset patch features, nearest-neighbour scoring, and a safe file format.

On disk a bank is two files side by side: `<name>.safetensors` (one tensor, "bank", (M, D)) and
`<name>.json` (format version, shape, dtype, the config that produced it, and the sha256 of the
safetensors file). Loading refuses anything else — a pickle, a truncated or edited file, a
future format version — with one line naming the file. Writes go to a temporary file first and
are renamed into place, so a failed save never destroys an earlier bank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from patchcore.distances import nearest_neighbours
from patchcore.errors import BankFormatError, ConfigError

BANK_FORMAT_VERSION = 1
NN_BACKENDS = ("torch", "faiss")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bank_paths(path: str | Path) -> tuple[Path, Path]:
    """`x`, `x.safetensors` or `x.json` -> (x.safetensors, x.json)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to `path` via a temporary sibling and a rename: never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class MemoryBank:
    """(M, D) float32 features with exact (chunked torch) or FAISS nearest-neighbour search."""

    def __init__(self, features: torch.Tensor, metadata: dict[str, Any] | None = None, nn_backend: str = "torch"):
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"a memory bank needs a non-empty (M, D) tensor, got {tuple(features.shape)}")
        if nn_backend not in NN_BACKENDS:
            raise ConfigError(f"unknown model.nn_backend {nn_backend!r}; choose one of {', '.join(NN_BACKENDS)}")
        self.features = features.float().contiguous()
        self.metadata = dict(metadata or {})
        self.nn_backend = nn_backend
        self._faiss_index = None

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def to(self, device: torch.device | str) -> "MemoryBank":
        self.features = self.features.to(device)
        return self

    def nearest(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> squared Euclidean distances (Q, k) and bank indices (Q, k)."""
        if self.nn_backend == "faiss":
            return self._faiss_search(queries, k)
        return nearest_neighbours(queries, self.features, k, squared=True)

    def _faiss_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            import faiss
        except ImportError:
            raise ConfigError("model.nn_backend 'faiss' needs faiss-cpu (pip install 'fedpatch[faiss]')") from None
        if self._faiss_index is None:
            self._faiss_index = faiss.IndexFlatL2(self.dim)
            self._faiss_index.add(self.features.cpu().numpy())
        d, i = self._faiss_index.search(queries.float().cpu().numpy(), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write `<path>.safetensors` + `<path>.json`; returns both paths."""
        tensor_path, meta_path = bank_paths(path)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tensor_path.with_name(f".{tensor_path.name}.tmp-{os.getpid()}")
        save_file({"bank": self.features.detach().cpu().contiguous()}, str(tmp), metadata={"format": "fedpatch-bank"})
        meta = {
            "format": "fedpatch-bank",
            "format_version": BANK_FORMAT_VERSION,
            "shape": list(self.features.shape),
            "dtype": "float32",
            "sha256": _sha256(tmp),
            "metadata": self.metadata,
        }
        os.replace(tmp, tensor_path)
        atomic_write_bytes(meta_path, (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode())
        return tensor_path, meta_path

    @classmethod
    def load(cls, path: str | Path, nn_backend: str = "torch") -> "MemoryBank":
        """Read and verify a bank written by `save`."""
        tensor_path, meta_path = bank_paths(path)
        for p in (tensor_path, meta_path):
            if not p.is_file():
                raise BankFormatError(f"memory bank file not found: {p}")
        head = tensor_path.read_bytes()[:2]
        if head[:1] == b"\x80" or head == b"PK":
            raise BankFormatError(f"{tensor_path} is a pickle/torch.save file; fedpatch banks are safetensors only")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankFormatError(f"{meta_path} is not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != "fedpatch-bank":
            raise BankFormatError(f"{meta_path} is not a fedpatch bank description")
        if meta.get("format_version") != BANK_FORMAT_VERSION:
            raise BankFormatError(
                f"{meta_path} has bank format version {meta.get('format_version')!r}; this fedpatch reads {BANK_FORMAT_VERSION}"
            )
        if _sha256(tensor_path) != meta.get("sha256"):
            raise BankFormatError(f"{tensor_path} fails its sha256 check: the file was modified or truncated")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BankFormatError(f"cannot read {tensor_path}: {str(exc).splitlines()[0][:200]}") from None
        bank = tensors.get("bank")
        if bank is None or list(bank.shape) != meta.get("shape"):
            raise BankFormatError(f"{tensor_path} does not hold the (M, D) 'bank' tensor its JSON describes")
        return cls(bank, meta.get("metadata", {}), nn_backend=nn_backend)
