"""The memory bank: coreset patch features, nearest-neighbour scoring, and a safe file format.

On disk a bank is two files side by side: `<name>.safetensors` (one tensor, "bank", (M, D)) and
`<name>.json` (format version, shape, dtype, the config that produced it, and the sha256 of the
safetensors file). Loading refuses anything else — a pickle, a truncated or edited file, a
future format version — with one line naming the file. Writes go to a temporary file first and
are renamed into place, so a failed save never destroys an earlier bank.

Nearest-neighbour backends (`model.nn_backend`): `torch`, exact, chunked to a memory budget, on
the bank's device (patchcore/distances.py); `faiss`, exact (IndexFlatL2, CPU); `faiss_ivfpq`,
approximate (IndexIVFPQ trained on the bank itself, `model.ivfpq`: nlist, m, nbits, nprobe, and
an optional exact re-ranking of k×refine candidates). Whichever backend finds the neighbours,
their distances are recomputed in the direct form Σ(q − b)² (`direct_distances`): the expanded
form's float32 cancellation was up to 2e-3 relative on tire's WideResNet bank. FAISS is the optional extra
`fedpatch[faiss]`; its indexes are built on first use and never saved (the bank file is the
truth). Measured trade-offs: experiments/studies/speed_coreset_nn.md.
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

from patchcore import strict_json
from patchcore.config import NN_BACKENDS, NN_PRECISIONS, IvfPqConfig
from patchcore.distances import Bf16Search, direct_distances, fast_bf16, nearest_neighbours
from patchcore.errors import BankFormatError, ConfigError

BANK_FORMAT_VERSION = 1


def _import_faiss(backend: str):
    try:
        import faiss
    except ImportError:
        raise ConfigError(f"model.nn_backend {backend!r} needs faiss-cpu (pip install 'fedpatch[faiss]')") from None
    return faiss


def build_faiss_index(bank, backend: str, ivfpq: IvfPqConfig):
    """A FAISS index over `bank` (M, D) float32 numpy: flat (exact) or IVF-PQ trained on the bank."""
    faiss = _import_faiss(backend)
    m, d = bank.shape
    if backend == "faiss":
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        return index
    if d % ivfpq.m:
        raise ConfigError(f"model.ivfpq.m = {ivfpq.m} must divide the feature dimension {d}")
    if m < max(ivfpq.nlist, 1 << ivfpq.nbits):
        raise ConfigError(f"a bank of {m} vectors is too small to train IVF-PQ with nlist={ivfpq.nlist}, "
                          f"nbits={ivfpq.nbits}: lower them or use model.nn_backend: faiss")
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, ivfpq.nlist, ivfpq.m, ivfpq.nbits)
    ivf.nprobe = min(ivfpq.nprobe, ivfpq.nlist)
    index = ivf
    if ivfpq.refine > 0:  # also keeps the full vectors, to re-rank the candidates exactly
        index = faiss.IndexRefineFlat(ivf)
        index.k_factor = float(ivfpq.refine)
    index.train(bank)
    index.add(bank)
    return index


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

    def __init__(self, features: torch.Tensor, metadata: dict[str, Any] | None = None, nn_backend: str = "torch",
                 ivfpq: IvfPqConfig | None = None, nn_precision: str = "auto"):
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"a memory bank needs a non-empty (M, D) tensor, got {tuple(features.shape)}")
        self.features = features.float().contiguous()
        self.metadata = dict(metadata or {})
        self._bf16: Bf16Search | None = None
        self.nn_precision = nn_precision
        self.set_backend(nn_backend, ivfpq)

    @property
    def nn_precision(self) -> str:
        """The torch backend's products for 1-NN: auto | float32 | bfloat16 (exact either way)."""
        return self._nn_precision

    @nn_precision.setter
    def nn_precision(self, value: str) -> None:
        if value not in NN_PRECISIONS:
            raise ConfigError(f"unknown model.nn_precision {value!r}; choose one of {', '.join(NN_PRECISIONS)}")
        self._nn_precision = value

    def uses_bf16(self, k: int = 1) -> bool:
        """Whether a k-NN search runs as bf16 products + exact re-ranking (1-NN, torch backend)."""
        if self.nn_backend != "torch" or k != 1 or self.nn_precision == "float32":
            return False
        return self.nn_precision == "bfloat16" or fast_bf16(self.features.device)

    def set_backend(self, nn_backend: str, ivfpq: IvfPqConfig | None = None) -> "MemoryBank":
        """Choose the NN backend (and IVF-PQ settings); a FAISS index is rebuilt on next use."""
        if nn_backend not in NN_BACKENDS:
            raise ConfigError(f"unknown model.nn_backend {nn_backend!r}; choose one of {', '.join(NN_BACKENDS)}")
        self._nn_backend = nn_backend
        self.ivfpq = ivfpq or IvfPqConfig()
        self._faiss_index = None
        return self

    @property
    def nn_backend(self) -> str:
        return self._nn_backend

    @nn_backend.setter
    def nn_backend(self, name: str) -> None:
        self.set_backend(name, self.ivfpq)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def to(self, device: torch.device | str) -> "MemoryBank":
        moved = self.features.to(device)
        if moved is not self.features:
            self._bf16 = None
        self.features = moved
        return self

    def nearest(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> squared Euclidean distances (Q, k) and bank indices (Q, k)."""
        if self.uses_bf16(k):
            if self._bf16 is None:  # prepared once per bank and device
                self._bf16 = Bf16Search(self.features)
            return self._bf16.search(queries)
        if self.nn_backend == "torch":
            _, found = nearest_neighbours(queries, self.features, k, squared=True)
        else:
            _, found = self._faiss_search(queries, k)
        # the products found the neighbours; their distances are recomputed directly (no cancellation)
        return direct_distances(queries, self.features, found.to(self.features.device))

    def _faiss_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._faiss_index is None:
            self._faiss_index = build_faiss_index(self.features.cpu().numpy(), self.nn_backend, self.ivfpq)
        d, i = self._faiss_index.search(queries.detach().float().cpu().contiguous().numpy(), k)
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
        atomic_write_bytes(meta_path, strict_json.dumps(meta).encode())  # NaN/inf -> null
        return tensor_path, meta_path

    @classmethod
    def load(cls, path: str | Path, nn_backend: str = "torch") -> "MemoryBank":
        """Read and verify a bank written by `save`."""
        tensor_path, meta_path = bank_paths(path)
        meta = read_described(tensor_path, meta_path, ("memory bank", "banks", "bank"), "fedpatch-bank",
                              BANK_FORMAT_VERSION)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BankFormatError(f"cannot read {tensor_path}: {str(exc).splitlines()[0][:200]}") from None
        bank = tensors.get("bank")
        if bank is None or list(bank.shape) != meta.get("shape"):
            raise BankFormatError(f"{tensor_path} does not hold the (M, D) 'bank' tensor its JSON describes")
        return cls(bank, meta.get("metadata", {}), nn_backend=nn_backend)


def read_described(tensor_path: Path, meta_path: Path, names: tuple[str, str, str], fmt: str,
                   version: int) -> dict[str, Any]:
    """The JSON description of a safetensors file, after the checks every fedpatch file gets:
    both files exist, no pickle, valid JSON of format `fmt` at `version`, sha256 matching.
    `names`: how errors call the thing (file, plural, description), e.g. memory bank / banks / bank."""
    thing, plural, desc = names
    for p in (tensor_path, meta_path):
        if not p.is_file():
            raise BankFormatError(f"{thing} file not found: {p}")
    with open(tensor_path, "rb") as handle:
        head = handle.read(2)
    if head[:1] == b"\x80" or head == b"PK":
        raise BankFormatError(f"{tensor_path} is a pickle/torch.save file; fedpatch {plural} are safetensors only")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankFormatError(f"{meta_path} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise BankFormatError(f"{meta_path} is not a fedpatch {desc} description")
    if meta.get("format_version") != version:
        raise BankFormatError(f"{meta_path} has {desc} format version {meta.get('format_version')!r}; "
                              f"this fedpatch reads {version}")
    if _sha256(tensor_path) != meta.get("sha256"):
        raise BankFormatError(f"{tensor_path} fails its sha256 check: the file was modified or truncated")
    return meta
