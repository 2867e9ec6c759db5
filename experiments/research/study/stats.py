"""Is a gap real? Paired bootstrap confidence intervals of an image-AUROC difference.

Two methods compared in a study scored exactly the same test images (experiments/research/replay.py), so
the honest interval of their difference resamples *images*, not seeds: each bootstrap draw picks
the same images (with replacement, anomalous and good images separately so both classes stay
present) for both methods and every seed, and the statistic is the seed-mean of the per-seed
AUROC differences. The percentile interval of 2,000 draws is the 95% CI; a gap is called real
only when that interval excludes 0. The spread over seeds (std of the per-seed differences) is
reported beside it: it measures what the seed moves (partition, coreset starts), the CI what the
finite test set leaves uncertain. The interval does not resample seeds (three seeds are too few
to resample), so a verdict also says whether every seed's difference has the same sign: a "real"
gap the seeds disagree on is as large as what a seed moves, and deserves more seeds.

AUROC is computed from ranks (`patchcore.metrics.rank_auroc`: Mann-Whitney U with average ranks
for ties), vectorised over all draws at once: scikit-learn's roc_auc_score would take ~1 ms per
call and 12,000 calls per comparison. It equals roc_auc_score exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patchcore.metrics import rank_auroc as auroc

DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """Method a minus method b, image AUROC, over seeds and resampled images."""

    mean: float  # seed-mean of the per-seed differences
    std: float  # std of the per-seed differences (0 with one seed)
    low: float  # CI bounds of the seed-mean difference, from resampled images
    high: float
    seeds: int
    images: int
    agree: bool = False  # every seed's difference has the same sign (and none is 0)

    @property
    def real(self) -> bool:
        """True when the confidence interval excludes 0."""
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        verdict = "real" if self.real else "within noise"
        return f"{self.mean:+.3f} (95% CI {self.low:+.3f} to {self.high:+.3f}; {verdict})"


def paired_bootstrap(labels: np.ndarray, a: np.ndarray, b: np.ndarray, draws: int = DRAWS,
                     level: float = LEVEL, seed: int = 0) -> PairedDifference:
    """`a`, `b`: (S, N) scores of two methods on the same N images for S seeds (or (N,) for one).

    The same stratified image resample is applied to both methods and all seeds in a draw."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    labels = np.asarray(labels).astype(bool)
    if a.shape != b.shape or a.shape[1] != labels.size:
        raise ValueError(f"paired scores need equal shapes (seeds, images): {a.shape}, {b.shape}, "
                         f"{labels.size} labels")
    per_seed = auroc(labels, a) - auroc(labels, b)  # (S,)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    idx = np.concatenate([rng.choice(pos, (draws, pos.size)), rng.choice(neg, (draws, neg.size))], axis=1)
    drawn = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]  # labels of every draw's images
    stats = np.empty(draws)
    for start in range(0, draws, 500):  # (S, 500, N) at a time: bounded memory
        rows = idx[start:start + 500]
        stats[start:start + 500] = (auroc(drawn, a[:, rows]) - auroc(drawn, b[:, rows])).mean(axis=0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return PairedDifference(mean=float(per_seed.mean()), std=float(per_seed.std(ddof=1)) if per_seed.size > 1 else 0.0,
                            low=float(low), high=float(high), seeds=int(a.shape[0]), images=int(labels.size),
                            agree=bool(np.all(per_seed > 0) or np.all(per_seed < 0)))


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of finite values; (nan, nan) when none."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
