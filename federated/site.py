"""One factory's work, free of Flower: local coresets to send, and scores on its own test images.

A `Site` is what runs inside a client. It owns one factory's images and one PatchCore model (the
backbone is loaded on first use, then reused for every category, for training and evaluation).
A deployed site is its own folder (`Site.from_folder`: the whole folder, any supported layout);
a simulated one is a shard of one root (federated/plan.py). Either way its outputs are the only
things that leave the factory: `info` gives its name and image counts, `local_payloads` coreset
patch vectors (n, D) per category, never pixels, `evaluate` plain numbers. `answer` is the client
side of the protocol (federated/protocol.py): one request's records in, the reply's records out,
the same for the Flower ClientApp and the in-process transport.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federated.config import ExperimentConfig
from federated.faults import InjectedFault, apply_to_shard, noise_like, parse_faults
from federated.partition import FactoryShard
from federated.payload import Payload, encode
from federated.privacy import PrivacySpec, privatize
from federated.protocol import (
    EVALUATE,
    IDENTIFY,
    TRAIN,
    EvaluateReply,
    EvaluateRequest,
    Records,
    SiteInfo,
    TrainReply,
    TrainRequest,
)
from patchcore.cache import FeatureCache
from patchcore.config import DATA_FORMATS, replace
from patchcore.data import ImageRecord, PairTransform
from patchcore.data.mvtec import list_categories
from patchcore.data.sources import load_records
from patchcore.errors import ConfigError, DataError
from patchcore.evaluation import evaluate_scored, loader_for, score_records
from patchcore.model import PatchCore


def release_seed(seed: int, factory_id: int, category: str) -> int:
    """The seed of one release's noise: distinct per (run seed, factory, category), stable
    across processes (Python's hash() is salted per process, so it is not used)."""
    return (int(seed) * 1_000_003 + int(factory_id) * 7919 + zlib.crc32(category.encode())) % (2**63)


def make_payload(coreset: torch.Tensor, *, config: ExperimentConfig, backbone_id: str,
                 factory_id: int, category: str, num_patches: int, num_images: int,
                 privacy: PrivacySpec | None, fault: str | None = None) -> tuple[Payload, dict[str, float]]:
    """What factory `factory_id` sends for `category`, from its local coreset (n, D) (already in
    the model's feature space: projected and clipped when model.transform says so).

    With privacy on, the vectors are clipped (again: a no-op after the model's clip) and get
    Gaussian noise of the spec's σ, seeded per (seed, factory, category); a `noise` fault replaces
    them with noise of the same norms. Returns (payload, release stats for the report).
    """
    stats: dict[str, float] = {}
    released = coreset
    if privacy is not None:
        generator = torch.Generator().manual_seed(release_seed(config.seed, factory_id, category))
        released, stats = privatize(coreset, privacy, generator)
    if fault == "noise":
        released = noise_like(released, release_seed(config.seed + 1, factory_id, category))
    payload = encode(released, num_patches=num_patches, num_images=num_images,
                     backbone_id=backbone_id, factory_id=factory_id,
                     dtype=config.federation.payload_dtype)
    return payload, {k: float(v) for k, v in stats.items()}


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The top-level numbers of a metrics dict as floats (nested breakdowns and flags dropped):
    what a factory may report back, and what a Flower MetricRecord can carry."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


FORMATS = tuple(f for f in DATA_FORMATS if f != "synthetic")  # a site's own images: mvtec, mvtec3d, autovi


def detect_format(root: Path) -> str:
    """The layout of a site's folder: `autovi` when a category has defects_config.json,
    `mvtec3d` when its images sit in train/good/rgb, else `mvtec`."""
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if any((p / "defects_config.json").is_file() for p in folders):
        return "autovi"
    if any((p / "train" / "good" / "rgb").is_dir() for p in folders):
        return "mvtec3d"
    return "mvtec"


def folder_shard(config: ExperimentConfig, path: str | Path, name: str, data_format: str = "",
                 categories: tuple[str, ...] = ()) -> tuple[FactoryShard, ExperimentConfig]:
    """A deployed site's shard: every image of its folder, in the categories it holds (those of
    data.categories when set, else all); and the config with data.root/format set to it."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"site {name}: data-path {root} is not a folder")
    data_format = data_format or detect_format(root)
    if data_format not in FORMATS:
        raise ConfigError(f"site {name}: data-format {data_format!r} must be one of {', '.join(FORMATS)}")
    wanted = tuple(categories) or tuple(config.data.categories)
    found = list_categories(root)
    held = [c for c in (wanted or found) if c in found]
    if not held:
        raise DataError(f"site {name}: no category folder under {root} "
                        f"(looked for {', '.join(wanted) if wanted else 'any'})")
    data = replace(config.data, root=str(root), format=data_format, categories=tuple(held))
    config = config.model_copy(update={"data": data})
    records = [r.with_domain(name) for c in held
               for r in load_records(data, root, c, config.threshold.holdout, config.seed)]
    shard = FactoryShard(factory_id=-1, site_name=name,
                         train=[r for r in records if r.split == "train"],
                         test=[r for r in records if r.split == "test"],
                         validation=[r for r in records if r.split == "validation"])
    return shard, config


class Site:
    """A factory: its images, its domain shift (simulations), and one PatchCore model."""

    def __init__(self, config: ExperimentConfig, shard: FactoryShard,
                 shifts: Mapping[str, PairTransform] | None = None,
                 device: str | torch.device | None = None,
                 model: PatchCore | None = None, root: Path | None = None,
                 memo: dict[tuple, torch.Tensor] | None = None) -> None:
        self.config = config
        self.fault = parse_faults(config.federation.faults, config.federation.num_factories).get(shard.name)
        self.shard = apply_to_shard(shard, self.fault)
        self.name = shard.name
        self.factory_id = shard.factory_id  # the server's id for it (deployed sites: assigned in train)
        self.privacy = config.privacy_spec()
        self.root = root  # the dataset folder: AutoVI's evaluation reads defects_config.json there
        self.shifts = dict(shifts or {})
        self.device = device or config.device
        self._model = model
        self.load_s = 0.0  # seconds spent building the backbone in this process (0: shared/reused)
        self.release_stats: dict[str, dict[str, float]] = {}
        # Local coresets by (images, settings): a sweep passes one dict per factory across variants.
        self._coresets: dict[tuple, torch.Tensor] = {} if memo is None else memo
        # Its own on-disk feature cache (data.cache_dir/<factory>): a rerun skips the backbone.
        self.cache = FeatureCache.under(config.data, self.name)

    @classmethod
    def from_folder(cls, config: ExperimentConfig, path: str | Path, name: str,
                    data_format: str = "", categories: tuple[str, ...] = (),
                    device: str | None = None, model: PatchCore | None = None) -> "Site":
        """A deployed site: its whole folder (format detected unless given), no domain shift."""
        shard, config = folder_shard(config, path, name, data_format, categories)
        return cls(config, shard, device=device, model=model, root=Path(config.data.root))

    @property
    def model(self) -> PatchCore:
        """The PatchCore model, built (backbone loaded) on first use."""
        if self._model is None:
            start = time.perf_counter()
            self._model = PatchCore(self.config.model, device=self.device, seed=self.config.seed)
            self.load_s = time.perf_counter() - start
        return self._model

    @property
    def device_used(self) -> str:
        """Where this site's model computes ("cuda:0", "cpu"), "" while no model is built (an
        empty shard builds none just to say so). federation.json records it per factory: the way
        to see that `device: auto` found the GPU share Ray gave a client actor."""
        return str(self._model.device) if self._model is not None else ""

    def _records(self, split: str, category: str) -> list[ImageRecord]:
        return [r for r in getattr(self.shard, split) if r.category == category]

    def info(self) -> SiteInfo:
        """Name and image counts per category (what the identify round announces)."""
        categories = sorted({r.category for split in ("train", "test", "validation")
                             for r in getattr(self.shard, split)})
        return SiteInfo(self.name, {c: {s: len(self._records(s, c)) for s in ("train", "test", "validation")}
                                    for c in categories})

    def _local_coreset(self, features: torch.Tensor, category: str) -> torch.Tensor:
        """The local coreset (n, D) of `features`, memoised per settings: a sweep that varies
        only what happens after the coreset (noise, encoding, screening) computes it once."""
        c, t = self.config.model.coreset, self.config.model.transform
        images = tuple(str(r.path) for r in self._records("train", category))
        key = (category, images, self.config.federation.local, self.config.seed, repr(c), repr(t),
               self.model.backbone_id, len(features))
        if key not in self._coresets:
            self._coresets[key] = self.model.subsample(features, self.config.federation.local, False)
        return self._coresets[key]

    def local_payloads(self, progress: bool = False) -> tuple[dict[str, Payload], dict[str, float]]:
        """({category: payload}, {phase: seconds}) for every category this factory trains on.

        Each payload is the greedy coreset (federation.local_ratio, or local_factor x global_ratio,
        of the extracted patches) of the factory's training images of that category; `num_patches`
        records how many patches it was drawn from, which is what the server weights the global
        budget by.
        """
        f = self.config.federation
        if self.fault == "crash":
            raise InjectedFault(f"injected fault: {self.name} crashed before sending")
        if self.fault == "hang":
            time.sleep(f.hang_s)
        payloads: dict[str, Payload] = {}
        seconds = {"extract_s": 0.0, "coreset_s": 0.0, "encode_s": 0.0}
        self.release_stats = {}
        for category in self.shard.categories():
            train = self._records("train", category)
            t0 = time.perf_counter()
            features = self.model.extract(loader_for(train, self.config, self.shifts), progress,
                                          desc=f"{self.name} {category}", cache=self.cache)  # (N·L, D)
            t1 = time.perf_counter()
            coreset = self._local_coreset(features, category)  # (n, D)
            t2 = time.perf_counter()
            payloads[category], self.release_stats[category] = make_payload(
                coreset, config=self.config, backbone_id=self.model.backbone_id,
                factory_id=self.factory_id, category=category, num_patches=len(features),
                num_images=len(train), privacy=self.privacy, fault=self.fault)
            seconds["extract_s"] += t1 - t0
            seconds["coreset_s"] += t2 - t1
            seconds["encode_s"] += time.perf_counter() - t2
            del features, coreset
        return payloads, seconds

    def evaluate(self, banks: Mapping[str, torch.Tensor | np.ndarray]
                 ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
        """({category: metrics} on this factory's own test images, {category: image scores of its
        held-out or validation normals}), each category scored with its global bank. The scores
        are what the server calibrates the global threshold on: numbers, never images."""
        out: dict[str, dict[str, float]] = {}
        calibration: dict[str, np.ndarray] = {}
        for category, bank in sorted(banks.items()):
            test = self._records("test", category)
            normals = [r for r in self._records("validation", category) if r.label == 0]
            if not test and not normals:
                continue
            features = torch.as_tensor(np.asarray(bank), dtype=torch.float32)  # (M, D)
            self.model.set_bank(features, {"category": category})
            if normals:
                calibration[category] = score_records(self.model, normals, self.config, self.shifts,
                                                      progress=False).scores.astype(np.float64)
            if not test:
                continue
            scored = score_records(self.model, test, self.config, self.shifts, progress=False)
            if self.config.data.evaluate_at_original and self.root is not None:
                metrics = evaluate_scored(scored, self.config, self.root, category)
            else:
                metrics = scored.metrics()
            out[category] = scalar_metrics(metrics)
        return out, calibration

    def _assigned(self, factory: str, factory_id: int) -> None:
        """Take the server's id; refuse a request meant for another factory."""
        if factory != self.name:
            raise ConfigError(f"this site is {self.name} but the server addressed {factory}")
        self.factory_id = int(factory_id)

    def answer(self, kind: str, records: Records) -> Records:
        """The client side of one exchange: request records in, reply records out."""
        start, cold = time.perf_counter(), self._model is None
        if kind == IDENTIFY:
            return self.info().to_records()
        if kind == TRAIN:
            request = TrainRequest.from_records(records)
            self._assigned(request.factory, request.factory_id)
            payloads, seconds = self.local_payloads(progress=False)
            release = {f"{c}.{k}": float(v) for c, st in self.release_stats.items() for k, v in st.items()}
            timings = {"backbone_load_s": self.load_s if cold else 0.0, **seconds,
                       "total_s": time.perf_counter() - start}
            return TrainReply(self.name, self.factory_id, payloads, len(self.shard.train),
                              timings, release, device=self.device_used).to_records()
        if kind == EVALUATE:
            ask = EvaluateRequest.from_records(records)
            self._assigned(ask.factory, ask.factory_id)
            metrics, calibration = self.evaluate(ask.banks)
            return EvaluateReply(self.name, metrics, {"evaluate_s": time.perf_counter() - start,
                                                      "evaluate_backbone_load_s": self.load_s if cold else 0.0},
                                 calibration).to_records()
        raise ConfigError(f"unknown message type {kind!r}: expected {IDENTIFY}, {TRAIN} or {EVALUATE}")
