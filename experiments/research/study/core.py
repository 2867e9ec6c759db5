"""What every study shares: seeds, plans, one feature cache, results with per-image scores.

A `Study` holds the base config, the seeds and the run folder. `replay(seed, **changes)` gives
the experiments/research/replay.py engine for one seed and one set of config changes: the factory plan of
that config, its embeddings extracted once (one feature cache for the whole study, so a second
plan over the same images only reads the cache; test embeddings are also kept in memory), and
its centralized coresets memoised, so the centralized model of a seed is fitted once and reused
by every condition that shares it. `results` collects, per (condition, method, seed, category),
the metrics and every test image's score, which is what `paired` needs for its bootstrap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.research.replay import Extracted, Replay, TestMemo, TestSet, extract, variant
from experiments.research.study.stats import PairedDifference, mean_std, paired_bootstrap
from federated.config import ExperimentConfig
from federated.plan import FactoryPlan, plan_factories
from patchcore.cache import FeatureCache
from patchcore.config import TransformConfig, to_dict
from patchcore.errors import ConfigError
from patchcore.evaluation import ScoredSet
from patchcore.model import PatchCore

METRICS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class Run:
    """One model's scores on one category's test images, for one seed."""

    condition: str
    method: str
    seed: int
    category: str
    paths: list[str]
    labels: np.ndarray  # (N,) 0/1
    scores: np.ndarray  # (N,)
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"condition": self.condition, "method": self.method, "seed": self.seed, "category": self.category,
                **{m: self.metrics.get(m) for m in METRICS}, "images": len(self.paths), **self.extra}


class Results:
    """Every run of a study; summaries (mean ± std over seeds) and paired differences."""

    def __init__(self) -> None:
        self.runs: list[Run] = []

    def add(self, condition: str, method: str, seed: int, category: str, scored: ScoredSet,
            **extra: Any) -> Run:
        run = Run(condition, method, seed, category, [str(r.path) for r in scored.records],
                  np.asarray(scored.labels), np.asarray(scored.scores, dtype=np.float64), scored.metrics(), extra)
        self.runs.append(run)
        return run

    def add_all(self, condition: str, method: str, seed: int, scored: dict[str, ScoredSet],
                **extra: Any) -> None:
        """One run per category; an `extra` value that is a {category: value} dict is split up."""
        for category, s in scored.items():
            own = {k: (v.get(category) if isinstance(v, dict) else v) for k, v in extra.items()}
            self.add(condition, method, seed, category, s, **own)

    def find(self, condition: str, method: str, category: str) -> list[Run]:
        return [r for r in self.runs if (r.condition, r.method, r.category) == (condition, method, category)]

    def keys(self) -> list[tuple[str, str, str]]:
        return list(dict.fromkeys((r.condition, r.method, r.category) for r in self.runs))

    def summary(self) -> list[dict[str, Any]]:
        """Mean ± std over seeds per (condition, method, category), numeric extras averaged."""
        rows = []
        for condition, method, category in self.keys():
            runs = self.find(condition, method, category)
            row: dict[str, Any] = {"condition": condition, "method": method, "category": category,
                                   "seeds": len(runs)}
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_std"] = mean_std([r.metrics.get(m) for r in runs])
            for k in dict.fromkeys(k for r in runs for k in r.extra):
                values = [r.extra.get(k) for r in runs]
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    row[k] = float(np.mean(values))
            rows.append(row)
        return rows

    def paired(self, a: tuple[str, str], b: tuple[str, str], category: str) -> PairedDifference | None:
        """AUROC(a) − AUROC(b) on the images both scored, over the seeds both ran; None when
        they share no seed or the common images lack a class."""
        runs_a = {r.seed: r for r in self.find(*a, category)}
        runs_b = {r.seed: r for r in self.find(*b, category)}
        seeds = sorted(set(runs_a) & set(runs_b))
        if not seeds:
            return None
        common = sorted(set.intersection(*(set(runs_a[s].paths) & set(runs_b[s].paths) for s in seeds)))
        if not common:
            return None

        def aligned(run: Run) -> tuple[np.ndarray, np.ndarray]:
            where = {p: i for i, p in enumerate(run.paths)}
            idx = np.array([where[p] for p in common])
            return run.scores[idx], run.labels[idx]

        labels = aligned(runs_a[seeds[0]])[1]
        if labels.min() == labels.max():
            return None
        sa = np.stack([aligned(runs_a[s])[0] for s in seeds])
        sb = np.stack([aligned(runs_b[s])[0] for s in seeds])
        return paired_bootstrap(labels, sa, sb)

    def difference_rows(self, pairs: Sequence[tuple[str, tuple[str, str], tuple[str, str]]]) -> list[dict[str, Any]]:
        """One row per (comparison label, category): a and b mean ± std, difference, CI."""
        rows = []
        categories = list(dict.fromkeys(r.category for r in self.runs))
        for label, a, b in pairs:
            for category in categories:
                d = self.paired(a, b, category)
                if d is None:
                    continue
                ma = mean_std([r.metrics["image_auroc"] for r in self.find(*a, category)])
                mb = mean_std([r.metrics["image_auroc"] for r in self.find(*b, category)])
                rows.append({"comparison": label, "category": category, "a": " / ".join(a), "b": " / ".join(b),
                             "a_mean": ma[0], "a_std": ma[1], "b_mean": mb[0], "b_std": mb[1],
                             "diff": d.mean, "diff_std": d.std, "ci_low": d.low, "ci_high": d.high,
                             "real": d.real, "seeds_agree": d.agree, "seeds": d.seeds, "images": d.images})
        return rows


class Study:
    """The base config, seeds, run folder and shared machinery of one `fedpatch study` run."""

    def __init__(self, name: str, config: ExperimentConfig, seeds: Sequence[int], out: Path,
                 progress: bool, options: dict[str, Any] | None = None) -> None:
        if not seeds:
            raise ConfigError("--seeds needs at least one seed")
        self.name, self.seeds, self.out, self.progress = name, list(seeds), Path(out), progress
        self.options = options or {}
        config = fixed_images(config)
        own = not config.data.cache_dir
        self.config = variant(config, **{"data.cache_dir": str(self.out / "features")}) if own else config
        self.own_cache = own  # removed when the study ends
        self.cache = FeatureCache(Path(self.config.data.cache_dir) / "study",
                                  max_bytes=int(self.config.data.cache_max_gb * 1e9),
                                  budget_root=Path(self.config.data.cache_dir))
        self.memo = TestMemo()
        self.results = Results()
        self._replays: dict[str, Replay] = {}
        self._models: dict[str, PatchCore] = {}
        self.timings: dict[str, float] = {}

    def config_for(self, seed: int, **changes: Any) -> ExperimentConfig:
        return variant(self.config, seed=seed, **changes)

    def model(self, config: ExperimentConfig) -> PatchCore:
        """One backbone per model config (raw embeddings: transforms are applied per variant)."""
        bare = variant(config, **{"model.transform": TransformConfig(), "federation.privacy.epsilon": None})
        # untrained weights ("none") are drawn from the seed, as the federation's sites draw them
        seed = config.seed if str(config.model.backbone.weights) == "none" else 0
        key = json.dumps([to_dict(bare.model), seed], sort_keys=True)
        if key not in self._models:
            self._models[key] = PatchCore(bare.model, device=config.device, seed=seed)
        return self._models[key]

    def replay(self, seed: int, plan_edit: Callable[[FactoryPlan], FactoryPlan] | None = None,
               edit_key: str = "", **changes: Any) -> Replay:
        """The replay engine of `config_for(seed, **changes)`, extracted once and memoised;
        `plan_edit` (named by `edit_key`) changes the plan before extraction."""
        config = self.config_for(seed, **changes)
        key = json.dumps([to_dict(config), edit_key], sort_keys=True, default=str)
        if key not in self._replays:
            start = time.time()
            plan = plan_factories(config)
            if plan_edit is not None:
                plan = plan_edit(plan)
            data = extract(config, plan, self.model(config), None, self.progress, cache=self.cache, memo=self.memo)
            self._replays[key] = Replay(config, data, self.progress, plan,
                                        self.out / "replays" / f"{len(self._replays):03d}", cache=self.cache)
            self.tick("extract", time.time() - start)
        return self._replays[key]

    def tick(self, phase: str, seconds: float) -> None:
        self.timings[phase] = round(self.timings.get(phase, 0.0) + seconds, 3)

    def say(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)


def fixed_images(config: ExperimentConfig) -> ExperimentConfig:
    """The same images under every seed: a synthetic dataset is generated once (with the base
    config's seed) and then read as the MVTec-layout folder it is; seeds vary the partition,
    the shifts and the coreset, never the pictures (paired comparisons need the same images)."""
    if config.data.format != "synthetic":
        return config
    from patchcore.data.sources import data_root

    root = data_root(config.data, config.seed)
    return variant(config, **{"data.format": "mvtec", "data.root": str(root),
                              "data.categories": tuple(config.data.categories or config.data.synthetic.categories)})


def subset(test: dict[str, TestSet], keep: Callable[[Any], bool]) -> dict[str, TestSet]:
    """The test sets restricted to the records `keep` accepts (categories left empty are dropped)."""
    out = {}
    for category, t in test.items():
        idx = [i for i, r in enumerate(t.records) if keep(r)]
        if idx:
            out[category] = TestSet(emb=t.emb[idx], grid=t.grid, records=[t.records[i] for i in idx], size=t.size,
                                    masks=t.masks[idx], has_mask=t.has_mask[idx])
    return out


def train_images(data: Extracted, category: str, factories: Sequence[int] | None = None):
    """The (N, L, D) training embeddings of `category` over `factories` (default all), per image."""
    length = int(np.prod(data.test[category].grid))
    return data.patches(category, factories).reshape(-1, length, data.train_dim)
