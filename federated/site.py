"""One factory's work, free of Flower: local coresets to send, and scores on its own test images.

A `Site` is what runs inside a client. It owns one PatchCore model (the backbone is loaded once
and reused for every category, for training and for evaluation) and one factory shard. Its
outputs are the only things that leave the factory: `local_payloads` gives coreset patch vectors
(n, D) per category, never pixels; `evaluate` gives plain numbers. The Flower adapter
(clients/app.py) only packs and unpacks them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from federated.config import ExperimentConfig
from federated.partition import FactoryShard
from federated.payload import Payload, encode
from patchcore.data import ImageDataset, ImageRecord, PairTransform, make_loader
from patchcore.data.sources import model_preprocess
from patchcore.metrics import evaluate as evaluate_metrics
from patchcore.model import PatchCore


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
                 model: PatchCore | None = None) -> None:
        start = time.perf_counter()
        self.config = config
        self.shard = shard
        self.shifts = dict(shifts or {})
        self.model = model or PatchCore(config.model, device=device or config.device,
                                        seed=config.seed)
        self.load_s = time.perf_counter() - start  # backbone construction, once per process

    @property
    def factory_id(self) -> int:
        return self.shard.factory_id

    def _loader(self, records: Sequence[ImageRecord]):
        """Records -> batches, each image shifted by its factory's camera before preprocessing."""
        dataset = ImageDataset(list(records), model_preprocess(self.config.data), self.shifts)
        return make_loader(dataset, self.config.data.batch_size, self.config.data.num_workers)

    def _records(self, split: str, category: str) -> list[ImageRecord]:
        return [r for r in getattr(self.shard, split) if r.category == category]

    def local_payloads(self, progress: bool = False) -> tuple[dict[str, Payload], dict[str, float]]:
        """({category: payload}, {phase: seconds}) for every category this factory trains on.

        Each payload is the greedy coreset (federation.local_ratio of the extracted patches) of
        the factory's training images of that category; `num_patches` records how many patches
        it was drawn from, which is what the server weights the global budget by.
        """
        f = self.config.federation
        payloads: dict[str, Payload] = {}
        seconds = {"extract_s": 0.0, "coreset_s": 0.0, "encode_s": 0.0}
        for category in self.shard.categories():
            train = self._records("train", category)
            t0 = time.perf_counter()
            features = self.model.extract(self._loader(train), progress,
                                          desc=f"{self.shard.name} {category}")  # (N·L, D)
            t1 = time.perf_counter()
            coreset = self.model.subsample(features, f.local_ratio, progress)  # (n, D)
            t2 = time.perf_counter()
            payloads[category] = encode(coreset, num_patches=len(features), num_images=len(train),
                                        backbone_id=self.model.backbone_id,
                                        factory_id=self.factory_id, dtype=f.payload_dtype)
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
            out[category] = scalar_metrics(self._score(test))
        return out

    def _score(self, records: Sequence[ImageRecord]) -> dict[str, Any]:
        """Metrics of one test set at the crop's resolution (pixel maps vs shifted masks)."""
        scores, maps, masks, has_mask = [], [], [], []
        for batch in self._loader(records):
            s, m = self.model.score_batch(batch["image"])  # (B,), (B, H, W)
            scores.append(s.cpu().numpy())
            maps.append(m.cpu().numpy().astype(np.float32))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)  # (B, H, W) bool
            has_mask.append(batch["has_mask"].numpy())
        labels = np.array([r.label for r in records], dtype=np.int64)  # (N,)
        return evaluate_metrics(labels, np.concatenate(scores), masks=np.concatenate(masks),
                                maps=np.concatenate(maps), defects=[r.defect for r in records],
                                has_mask=np.concatenate(has_mask))

