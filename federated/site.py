"""One factory's work, free of Flower: local coresets to send, and scores on its own test images.

A `Site` is what runs inside a client. It owns one PatchCore model (the backbone is loaded once
and reused for every category, for training and for evaluation) and one factory shard. Its
outputs are the only things that leave the factory: `local_payloads` gives coreset patch vectors
(n, D) per category, never pixels; `evaluate` gives plain numbers. The Flower adapter
(clients/app.py) only packs and unpacks them.
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
from patchcore.cache import FeatureCache
from patchcore.data import ImageRecord, PairTransform
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


class Site:
    """A factory: its shard, its domain shift, and one loaded PatchCore model."""

    def __init__(self, config: ExperimentConfig, shard: FactoryShard,
                 shifts: Mapping[str, PairTransform] | None = None,
                 device: str | torch.device | None = None,
                 model: PatchCore | None = None, root: Path | None = None) -> None:
        start = time.perf_counter()
        self.config = config
        self.fault = parse_faults(config.federation.faults, config.federation.num_factories).get(shard.factory_id)
        self.shard = apply_to_shard(shard, self.fault)
        self.privacy = config.privacy_spec()
        self.root = root  # the dataset folder: AutoVI's evaluation reads defects_config.json there
        self.shifts = dict(shifts or {})
        self.model = model or PatchCore(config.model, device=device or config.device,
                                        seed=config.seed)
        self.load_s = time.perf_counter() - start  # backbone construction, once per process
        # Its own on-disk feature cache (data.cache_dir/<factory>): a rerun skips the backbone.
        cache_dir = config.data.cache_dir
        self.cache = FeatureCache.under(cache_dir, shard.name)

    @property
    def factory_id(self) -> int:
        return self.shard.factory_id

    def _records(self, split: str, category: str) -> list[ImageRecord]:
        return [r for r in getattr(self.shard, split) if r.category == category]

    def local_payloads(self, progress: bool = False) -> tuple[dict[str, Payload], dict[str, float]]:
        """({category: payload}, {phase: seconds}) for every category this factory trains on.

        Each payload is the greedy coreset (federation.local_ratio of the extracted patches) of
        the factory's training images of that category; `num_patches` records how many patches
        it was drawn from, which is what the server weights the global budget by.
        """
        f = self.config.federation
        if self.fault == "crash":
            raise InjectedFault(f"injected fault: {self.shard.name} crashed before sending")
        if self.fault == "hang":
            time.sleep(f.hang_s)
        payloads: dict[str, Payload] = {}
        seconds = {"extract_s": 0.0, "coreset_s": 0.0, "encode_s": 0.0}
        self.release_stats: dict[str, dict[str, float]] = {}
        for category in self.shard.categories():
            train = self._records("train", category)
            t0 = time.perf_counter()
            features = self.model.extract(loader_for(train, self.config, self.shifts), progress,
                                          desc=f"{self.shard.name} {category}", cache=self.cache)  # (N·L, D)
            t1 = time.perf_counter()
            coreset = self.model.subsample(features, f.local_ratio, progress)  # (n, D)
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

    def evaluate(self, banks: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, dict[str, float]]:
        """{category: metrics} on this factory's own test images, each category scored with its
        global bank; categories without test images here are skipped."""
        out: dict[str, dict[str, float]] = {}
        for category, bank in sorted(banks.items()):
            test = self._records("test", category)
            if not test:
                continue
            features = torch.as_tensor(np.asarray(bank), dtype=torch.float32)  # (M, D)
            self.model.set_bank(features, {"category": category})
            scored = score_records(self.model, test, self.config, self.shifts, progress=False)
            if self.config.data.evaluate_at_original and self.root is not None:
                metrics = evaluate_scored(scored, self.config, self.root, category)
            else:
                metrics = scored.metrics()
            out[category] = scalar_metrics(metrics)
        return out
