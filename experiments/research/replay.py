"""Replaying federations on features extracted once: the engine of sweeps and studies.

Every factory's patch embeddings (train and test) are extracted once, into memory and into a
feature cache. Each variant is then a whole federation through the same rounds as `fedpatch
federate` and a deployment (federated.rounds.run_rounds over the in-process transport, with the
real Sites: clip, local coreset, noise, encoding, validation, poisoning screen, coreset of
coresets); its sites read their training features from the cache and reuse their local coresets
when only later steps change. Centralized references are coresets of the same embeddings, and
every bank is scored by PatchCore's own scoring code on the extracted test embeddings, so two
methods compared here saw exactly the same test images.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federated.config import ExperimentConfig
from federated.faults import apply_to_shard
from federated.partition import factory_name
from federated.payload import raw_feature_bytes
from federated.plan import FactoryPlan
from federated.rounds import InProcessTransport, run_rounds
from federated.site import Site
from patchcore.cache import FeatureCache, shift_identity, weights_identity
from patchcore.config import to_dict
from patchcore.coreset import coverage_radius
from patchcore.data.records import ImageRecord
from patchcore.evaluation import ScoredSet, loader_for
from patchcore.memory_bank import MemoryBank
from patchcore.model import PatchCore, feature_transform, patch_scores, scores_from_patches, subsample
from patchcore.progress import track


@dataclass
class TestSet:
    """One category's test images, embedded: what every bank of a comparison is scored on."""

    emb: torch.Tensor  # (N, L, D) raw embeddings (before model.transform)
    grid: tuple[int, int]
    records: list[ImageRecord]
    size: tuple[int, int]  # (H, W) of the model input: the maps' size
    masks: np.ndarray  # (N, H, W) bool
    has_mask: np.ndarray  # (N,) bool

    def __getitem__(self, key: str) -> Any:  # the dict-style access older callers use
        return getattr(self, key)


@dataclass
class Extracted:
    """Raw patch embeddings (before model.transform), extracted once per sweep or study plan."""

    train: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (N·L, D) per factory, category
    images: dict[tuple[int, str], int] = field(default_factory=dict)
    test: dict[str, TestSet] = field(default_factory=dict)

    def patches(self, category: str, factories: list[int] | None = None) -> torch.Tensor:
        """(N·L, D) training patches of `category` over `factories` (default every honest factory),
        in factory order; empty (0, D) when none."""
        parts = [x for (k, c), x in sorted(self.train.items())
                 if c == category and k >= 0 and (factories is None or k in factories)]
        return torch.cat(parts) if parts else torch.empty(0, self.train_dim)

    @property
    def train_dim(self) -> int:
        """D of the raw embeddings: the upload-ratio denominator counts raw fp32 features."""
        return int(next(iter(self.train.values())).shape[1])


class TestMemo:
    """In-memory test embeddings, keyed by image, shift and feature settings: a study scores the
    same test images under many seeds and variants and embeds each (image, shift) once."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str], tuple[torch.Tensor, np.ndarray, bool]] = {}
        self.meta: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # settings -> grid, size


def _settings(model: PatchCore, config: ExperimentConfig) -> str:
    d = config.data
    return json.dumps({"model": model.backbone_id,
                       "weights": weights_identity(str(model.config.backbone.weights), model.seed),
                       "resize": d.resize, "crop": d.crop}, sort_keys=True)


def embed_test(model: PatchCore, records: list[ImageRecord], config: ExperimentConfig, shifts: dict,
               progress: bool, desc: str, memo: TestMemo | None = None) -> TestSet:
    """Embeddings, masks and grid of `records` (in order), each image through its factory's shift;
    images already in `memo` skip the loader and the backbone."""
    memo = memo if memo is not None else TestMemo()
    settings = _settings(model, config)
    keys = [(r.path if isinstance(r.path, str) else str(r.path), shift_identity(shifts.get(r.domain)) or "",
             settings) for r in records]
    missing = [i for i, k in enumerate(keys) if k not in memo.items]
    if missing:
        todo = [records[i] for i in missing]
        position = iter(missing)
        for batch in track(loader_for(todo, config, shifts), f"{desc} ({len(todo)} to embed)", progress):
            emb, grid = model.embed(batch["image"])  # (B, L, D)
            memo.meta[settings] = (grid, tuple(batch["image"].shape[-2:]))
            masks, flags = batch["mask"][:, 0].numpy() > 0.5, batch["has_mask"].numpy()
            for row, mask, flag in zip(emb.cpu(), masks, flags):
                memo.items[keys[next(position)]] = (row, mask, bool(flag))
    grid, size = memo.meta[settings]
    found = [memo.items[k] for k in keys]
    return TestSet(emb=torch.stack([f[0] for f in found]), grid=grid, records=list(records), size=size,
                   masks=np.stack([f[1] for f in found]), has_mask=np.array([f[2] for f in found]))


def extract(config: ExperimentConfig, plan: FactoryPlan, model: PatchCore, poisoner: int | None,
            progress: bool, cache: FeatureCache | None = None, memo: TestMemo | None = None) -> Extracted:
    """Every factory's training embeddings (the poisoner's `defects` shard included) and the
    union test set's embeddings, per category (the poisoner's training images left out).
    `cache`: one feature cache for every factory (a study's); default each factory's own folder."""
    out = Extracted()
    shards = list(plan.shards)
    hostile = apply_to_shard(shards[poisoner], "defects") if poisoner is not None else None
    used = {r.path for r in hostile.train} if hostile else set()
    for shard in shards + ([dataclasses.replace(hostile, factory_id=-1)] if hostile else []):
        owner = shard if shard.factory_id >= 0 else shards[poisoner]  # the hostile copy is the poisoner's
        model.cache = cache or FeatureCache.under(config.data, owner.name)  # the factory's own folder
        for category in plan.categories:
            train = [r for r in shard.train if r.category == category]
            if train:
                key = (shard.factory_id, category)
                out.train[key] = model.extract(loader_for(train, config, plan.shifts), progress,
                                               desc=f"{factory_name(shard.factory_id)} {category}").cpu()
                out.images[key] = len(train)
    for category in plan.categories:
        records = [r for s in shards for r in s.test if r.category == category and r.path not in used]
        out.test[category] = embed_test(model, records, config, plan.shifts, progress, f"test {category}", memo)
    return out


class Replay:
    """Variants of one experiment on one set of images: each federation runs through the same
    rounds as every other (federated.rounds.run_rounds, in-process transport, the real Sites:
    clip, coreset, noise, encoding, validation, screening, aggregation), its training features
    read from the feature cache after the first variant and its local coresets memoised per
    factory; centralized references and scoring reuse the embeddings extracted once."""

    def __init__(self, config: ExperimentConfig, data: Extracted, progress: bool, plan: FactoryPlan,
                 out: Path, keep_banks: bool = False, cache: FeatureCache | None = None) -> None:
        """`config.data.cache_dir` (or `cache`) should be the cache `extract` filled: the sites
        read their training features from it (without one, every variant runs the backbone again)."""
        self.config, self.data, self.progress, self.keep_banks = config, data, progress, keep_banks
        self.plan, self.out, self.cache = plan, Path(out), cache
        self._coresets: dict[tuple, torch.Tensor] = {}
        self._memos: dict[int, dict[tuple, torch.Tensor]] = {}  # per factory, across variants
        self._models: dict[str, PatchCore] = {}  # one backbone per model config
        self.runs = 0

    def _transformed(self, x: torch.Tensor, config: ExperimentConfig) -> torch.Tensor:
        t = feature_transform(config.model)
        return x if t.identity else t(x)

    def _model(self, config: ExperimentConfig) -> PatchCore:
        key = json.dumps(to_dict(config.model), sort_keys=True)
        if key not in self._models:
            self._models[key] = PatchCore(config.model, device=config.device, seed=config.seed)
        return self._models[key]

    def federated(self, config: ExperimentConfig, factories: list[int],
                  fault: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Global banks {category: (M, d)} and a small report of one federation of the plan's
        factories `factories` (ids 0..n-1); `fault` ("defects" or "noise") turns the last hostile."""
        faults = (f"{factories[-1]}:{fault}",) if fault else ()
        config = variant(config, **{"federation.num_factories": len(factories), "federation.faults": faults,
                                    "federation.min_clients": min(config.federation.min_clients, len(factories))})
        sites = [Site(config, self.plan.shards[k], self.plan.shifts, model=self._model(config),
                      root=self.plan.root, memo=self._memos.setdefault(k, {})) for k in factories]
        if self.cache is not None:
            for site in sites:
                site.cache = self.cache
        run_dir = self.out / "federations" / f"{self.runs:02d}"
        self.runs += 1
        result = run_rounds(InProcessTransport(sites), config, run_dir, evaluate=False)
        banks = {c: MemoryBank.load(run_dir / "federated" / "banks" / c).features
                 for c in sorted(result["aggregation"])}
        shutil.rmtree(run_dir / "federated" / "payloads", ignore_errors=True)  # the report stays
        if not self.keep_banks:  # a tire bank is ~70 MB a variant: kept on request only
            shutil.rmtree(run_dir / "federated" / "banks", ignore_errors=True)
        return banks, self._report(result, run_dir)

    def _report(self, result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        per_category: dict[str, dict[str, int]] = {}
        for stats in result["factories"].values():
            for c, st in stats["categories"].items():
                row = per_category.setdefault(c, {"bytes_sent": 0, "raw_feature_bytes": 0})
                row["bytes_sent"] += st["bytes_sent"]
                row["raw_feature_bytes"] += raw_feature_bytes(st["num_patches"], self.data.train_dim)
        release = {f"{name}.{k}": v for name, stats in result["factories"].items()
                   for k, v in stats.get("release", {}).items()}
        return {"bytes_sent": {c: v["bytes_sent"] for c, v in per_category.items()},
                "raw_feature_bytes": {c: v["raw_feature_bytes"] for c, v in per_category.items()},
                "rejected": result["rejected"], "poisoning": result["poisoning"], "release": release,
                "run_dir": str(run_dir),
                "flagged": sorted({factory_name(k) for c in result["poisoning"].values()
                                   for k in c.get("flagged", [])})}

    def centralized(self, config: ExperimentConfig, factories: list[int]) -> dict[str, torch.Tensor]:
        """One coreset per category over the union of the factories' (transformed) embeddings."""
        banks = {}
        for category in sorted({c for (_, c) in self.data.train}):
            key = (category, tuple(factories), feature_transform(config.model).tag(), repr(config.model.coreset),
                   config.seed)
            if key not in self._coresets:
                union = self.data.patches(category, factories)
                if not len(union):
                    continue
                union = self._transformed(union, config)
                self._coresets[key] = subsample(union, config.model, config.seed)
            banks[category] = self._coresets[key]
        return banks

    def coverage(self, config: ExperimentConfig, banks: dict[str, torch.Tensor]) -> dict[str, float]:
        """{category: coverage radius of its bank over every factory's (transformed) training patches}."""
        out = {}
        for category, bank in sorted(banks.items()):
            out[category] = coverage_radius(bank, self._transformed(self.data.patches(category), config))
        return out

    def scored(self, config: ExperimentConfig, banks: dict[str, torch.Tensor],
               test: dict[str, TestSet] | None = None) -> dict[str, ScoredSet]:
        """{category: ScoredSet} of `banks` on the extracted test set (or `test`), scored by
        PatchCore's own patch-score and map code (queries transformed as the bank's space says)."""
        out = {}
        for category, bank in sorted(banks.items()):
            t = (test or self.data.test)[category]
            n, length, dim = t.emb.shape
            queries = self._transformed(t.emb.reshape(n * length, dim), config).reshape(n, length, -1)
            bank = MemoryBank(bank.float(), nn_backend=config.model.nn_backend, ivfpq=config.model.ivfpq,
                              nn_precision=config.model.nn_precision)
            patch = patch_scores(bank, queries, t.grid, config.model)
            scores, maps = scores_from_patches(patch, t.size, config.model)
            out[category] = ScoredSet(t.records, scores.numpy(), maps.numpy(), t.masks, t.has_mask)
        return out

    def score(self, config: ExperimentConfig, banks: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Metrics per category of `banks` on the extracted test set."""
        return {c: s.metrics() for c, s in self.scored(config, banks).items()}


def variant(base: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """`base` with dotted-key changes, validated like a loaded config."""
    config = base
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        parts = section.split(".") if section else []
        objs = [config]
        for p in parts:
            objs.append(getattr(objs[-1], p))
        new = objs[-1].model_copy(update={key: value})  # not validated: checked whole below
        for obj, p in zip(reversed(objs[:-1]), reversed(parts)):
            new = obj.model_copy(update={p: new})
        config = new
    return config.validate()
