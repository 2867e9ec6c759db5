"""How well an attack did: PSNR and SSIM of decoded patches, AUROC and TPR at low FPR, CIs.

scikit-image is not a dependency, so SSIM is implemented here with scikit-image's defaults for
`structural_similarity(a, b, data_range=1, channel_axis=-1)`: a uniform 7x7 window, K1 = 0.01,
K2 = 0.03, sample covariances (N/(N-1)), the mean over the windows that lie wholly inside the
patch (the border of (7-1)/2 pixels cropped) and over channels. tests/test_audit.py checks it
against a direct loop over windows and, where scikit-image is installed, against scikit-image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from patchcore.metrics import rank_auroc

SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(decoded: np.ndarray, true: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-patch PSNR in dB of (n, ...) arrays (values in [0, data_range]): 10 log10(R^2 / MSE);
    an exact reconstruction is capped at 100 dB instead of inf."""
    decoded, true = _pair(decoded, true)
    mse = ((decoded - true) ** 2).reshape(len(true), -1).mean(axis=1)  # (n,)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(data_range ** 2 / mse)
    return np.minimum(out, 100.0)


def ssim(decoded: np.ndarray, true: np.ndarray, data_range: float = 1.0,
         win_size: int = SSIM_WINDOW) -> np.ndarray:
    """Per-patch SSIM of (n, H, W, C) arrays (scikit-image's defaults, module docstring); H and W
    must be >= win_size. Returns (n,)."""
    x, y = _pair(decoded, true)
    if x.ndim != 4:
        raise ValueError(f"ssim expects (n, H, W, C) patches, got shape {x.shape}")
    if min(x.shape[1:3]) < win_size:
        raise ValueError(f"ssim needs patches of at least {win_size}x{win_size} pixels, got {x.shape[1:3]}")
    size = (1, win_size, win_size, 1)  # filter over the two spatial axes only
    mean = lambda a: ndimage.uniform_filter(a, size=size, mode="reflect")  # noqa: E731
    ux, uy = mean(x), mean(y)
    uxx, uyy, uxy = mean(x * x), mean(y * y), mean(x * y)
    cov_norm = win_size ** 2 / (win_size ** 2 - 1.0)  # sample covariance, as scikit-image
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    inner = s[:, pad:s.shape[1] - pad, pad:s.shape[2] - pad, :]  # windows wholly inside
    return inner.reshape(len(s), -1).mean(axis=1)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"decoded {a.shape} and true {b.shape} patches must be (n, ...) of one shape")
    return a, b


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of scores where `positive` should score higher than `negative`; nan if one is empty."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(positive) or not len(negative):
        return float("nan")
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return float(roc_auc_score(labels, np.r_[positive, negative]))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> float:
    """The largest true-positive rate at a threshold whose false-positive rate is <= `fpr`.

    With n negatives the FPR moves in steps of 1/n, so below n = 1/fpr this is the TPR at FPR 0
    (every positive above the highest negative): conservative, never optimistic."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(positive) or not len(negative):
        return float("nan")
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    fprs, tprs, _ = roc_curve(labels, np.r_[positive, negative])
    return float(tprs[fprs <= fpr + 1e-12].max())


def auroc_ci(positive: np.ndarray, negative: np.ndarray, resamples: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, each class resampled on its own (stratified)."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(positive) < 2 or len(negative) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(positive), bool), np.zeros(len(negative), bool)]
    values = np.empty(resamples)
    for i in range(resamples):
        p = positive[rng.integers(0, len(positive), len(positive))]
        n = negative[rng.integers(0, len(negative), len(negative))]
        values[i] = rank_auroc(labels, np.r_[p, n])
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))

