"""The attacks a curious server can run on what it receives: pure functions of arrays.

- **Inversion**: a decoder from a patch embedding to the pixels under it, trained on images the
  attacker owns (never the victim's), applied to the victim's released vectors. `patch_windows`
  says which pixels a grid cell "is": the window of `window` x `window` pixels centred on the
  cell's stride-aligned block (window = stride: the block itself, the cells then tile the image;
  larger windows overlap their neighbours, as the 3x3 patch neighbourhood and the backbone's
  receptive field do). Decoders: ridge regression (closed form, the ridge strength chosen on a
  held-out share of the attacker's own images) and a small MLP (torch, CPU, time-capped). Both
  are noise-aware: when the release adds Gaussian noise of a known sigma (DP: sigma is published
  in every manifest), the attacker trains on equally noisy inputs (the ridge in closed form:
  E[(X+N)^T(X+N)] = X^T X + n sigma^2 I), which is the best a linear decoder can do.
- **Membership**: `nearest_scores` scores each candidate image by how close its patches come to
  the released vectors (a member's own patches were released: at distance ~0 without noise).
- **Attribution**: `attribution_attack`, a logistic regression from a vector to the factory that
  sent it, trained and tested on disjoint vectors; accuracy against chance 1/K.

Lower bounds on leakage, not upper ones: a stronger attacker (a generative prior, several
rounds, auxiliary data) can only do better.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from federated.audit.measures import psnr, ssim

Decoder = Callable[[np.ndarray], np.ndarray]  # (n, d) vectors -> (n, P) pixel windows in [0, 1]


def cell_offsets(size: tuple[int, int], grid: tuple[int, int], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel (rows (h,), cols (w,)) of each grid cell's window: centred on the cell's
    block of H/h x W/w pixels; may be negative or run past the edge (callers pad)."""
    (height, width), (h, w) = size, grid
    rows = np.floor((np.arange(h) + 0.5) * height / h - window / 2.0 + 0.5).astype(int)
    cols = np.floor((np.arange(w) + 0.5) * width / w - window / 2.0 + 0.5).astype(int)
    return rows, cols


def patch_windows(images: np.ndarray, grid: tuple[int, int], window: int,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """The pixels under grid cells: images (N, H, W, C) (uint8 0-255, or float in [0, 1]) ->
    (K, window, window, C) float32 in [0, 1], one per row of the embeddings (image-major, cells
    row-major, as `PatchCore.embed` orders them), or only the rows `rows` (indices into N·h·w).
    Windows that run past the image edge are filled by reflection."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got {images.shape}")
    n, height, width, _ = images.shape
    h, w = grid
    top, left = cell_offsets((height, width), grid, window)
    pad = max(window, 1)
    rows = np.arange(n * h * w) if rows is None else np.asarray(rows, dtype=np.int64)
    image_of, cell = np.divmod(rows, h * w)
    i, j = np.divmod(cell, w)
    out = np.empty((len(rows), window, window, images.shape[3]), dtype=np.float32)
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    for k in np.unique(image_of):
        padded = np.pad(images[k], ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        for r in np.flatnonzero(image_of == k):
            y, x = top[i[r]] + pad, left[j[r]] + pad
            out[r] = padded[y:y + window, x:x + window]
    return out / scale


@dataclass
class Ridge:
    """A fitted linear decoder: standardise, multiply, add the target mean."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    weight: np.ndarray  # (d, P)
    bias: np.ndarray  # (P,)
    alpha: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias


def fit_ridge(x: np.ndarray, y: np.ndarray, noise_sigma: float = 0.0,
              alphas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
              holdout: float = 0.2, seed: int = 0, groups: np.ndarray | None = None) -> Ridge:
    """Ridge regression x (n, d) -> y (n, P), inputs standardised; the strength (relative to n)
    is the one with the smallest MSE on a held-out share of the rows (whole images when `groups`
    gives each row's image), then refitted on all rows. `noise_sigma`: the decoder will see
    inputs with N(0, sigma^2) added per coordinate, so it is fitted for them (in expectation;
    the held-out inputs get real noise)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    groups = np.arange(len(x)) if groups is None else np.asarray(groups)
    names = np.unique(groups)
    held = np.isin(groups, rng.choice(names, max(1, int(round(holdout * len(names)))), replace=False))
    if held.all() or not held.any():
        held = np.zeros(len(x), bool)
    best = (np.inf, alphas[0])
    if held.any():
        fit_part = _ridge_parts(x[~held], y[~held], noise_sigma)
        noisy = x[held] + (rng.standard_normal(x[held].shape) * noise_sigma if noise_sigma > 0 else 0.0)
        for alpha in alphas:
            model = _solve(*fit_part, alpha)
            err = float(((model(noisy) - y[held]) ** 2).mean())
            if err < best[0]:
                best = (err, alpha)
    return _solve(*_ridge_parts(x, y, noise_sigma), best[1])


def _ridge_parts(x: np.ndarray, y: np.ndarray, noise_sigma: float):
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    xs = (x - mean) / scale
    gram = xs.T @ xs  # (d, d)
    gram[np.diag_indices_from(gram)] += len(x) * (noise_sigma / scale) ** 2  # E over the noise
    ymean = y.mean(axis=0)
    return mean, scale, gram, xs.T @ (y - ymean), ymean, len(x)


def _solve(mean, scale, gram, cross, ymean, n, alpha) -> Ridge:
    a = gram.copy()
    a[np.diag_indices_from(a)] += alpha * n
    return Ridge(mean, scale, np.linalg.solve(a, cross), ymean, float(alpha))


class Mlp:
    """A fitted MLP decoder (CPU): standardised input -> 2 hidden GELU layers -> pixels."""

    def __init__(self, net: torch.nn.Module, mean: np.ndarray, scale: np.ndarray, ymean: np.ndarray,
                 epochs: int, seconds: float) -> None:
        self.net, self.mean, self.scale, self.ymean = net, mean, scale, ymean
        self.epochs, self.seconds = epochs, seconds

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        xs = torch.as_tensor((np.asarray(x, np.float32) - self.mean) / self.scale)
        out = torch.cat([self.net(part) for part in xs.split(8192)]) if len(xs) else torch.empty(0)
        return out.numpy().astype(np.float64) + self.ymean


def fit_mlp(x: np.ndarray, y: np.ndarray, noise_sigma: float = 0.0, seed: int = 0, hidden: int = 512,
            max_epochs: int = 40, time_limit_s: float = 60.0, batch_size: int = 256,
            lr: float = 1e-3) -> Mlp:
    """An MLP x (n, d) -> y (n, P) by Adam on the MSE; each batch's inputs get fresh N(0, sigma^2)
    noise when `noise_sigma` > 0 (noise-aware). Stops after `max_epochs` or `time_limit_s`. Runs
    on one CPU thread: its small products ran 6x faster so than on two busy cores (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_mlp(x, y, noise_sigma, seed, hidden, max_epochs, time_limit_s, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(x, y, noise_sigma, seed, hidden, max_epochs, time_limit_s, batch_size, lr) -> Mlp:
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
    mean, scale = x32.mean(axis=0), x32.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    ymean = y32.mean(axis=0)
    xt, yt = torch.as_tensor(x32), torch.as_tensor(y32 - ymean)
    mt, st = torch.as_tensor(mean), torch.as_tensor(scale)
    net = torch.nn.Sequential(torch.nn.Linear(x32.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, y32.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_epochs)
    epochs = 0
    for epochs in range(1, max_epochs + 1):
        order = torch.randperm(len(xt), generator=generator)
        for part in order.split(batch_size):
            inputs = xt[part]
            if noise_sigma > 0:
                inputs = inputs + noise_sigma * torch.randn(inputs.shape, generator=generator)
            loss = torch.nn.functional.mse_loss(net((inputs - mt) / st), yt[part])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if time.perf_counter() - start > time_limit_s:
            break
    net.eval()
    return Mlp(net, mean, scale, ymean.astype(np.float64), epochs, time.perf_counter() - start)


def inversion_scores(decoded: np.ndarray, true: np.ndarray, baseline: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch PSNR/SSIM of decoded windows (n, w, w, C) (clipped to [0, 1]) and of the
    baseline (the attacker's mean window, (w, w, C), the same guess for every patch) against the
    true windows (n, w, w, C)."""
    decoded = np.clip(np.asarray(decoded, np.float64).reshape(true.shape), 0.0, 1.0)
    guess = np.broadcast_to(np.clip(baseline, 0.0, 1.0), true.shape)
    out = {"psnr": psnr(decoded, true), "psnr_baseline": psnr(guess, true)}
    if min(true.shape[1:3]) >= 7:
        out["ssim"], out["ssim_baseline"] = ssim(decoded, true), ssim(guess, true)
    return out


def nearest_sq_distances(bank: np.ndarray | torch.Tensor, queries: np.ndarray | torch.Tensor,
                         chunk: int = 8192) -> np.ndarray:
    """Squared L2 distance of each query row (q, d) to its nearest bank row (m, d). float32
    products, the norms' cancellation kept small by centring both on the bank's mean: the error
    is ~1e-6 of the squared norms, far below the distances that separate members (an fp16
    payload is off by ~1e-3 relative)."""
    bank = torch.as_tensor(np.asarray(bank), dtype=torch.float32)
    queries = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    centre = bank.mean(dim=0) if len(bank) else torch.zeros(bank.shape[1])
    bank, queries = bank - centre, queries - centre
    bank_sq = (bank * bank).sum(dim=1)  # (m,)
    out = torch.empty(len(queries), dtype=torch.float64)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        d = torch.addmm(bank_sq, q, bank.T, alpha=-2.0)  # ||b||² - 2 q·b, (c, m)
        out[s:s + chunk] = (d.min(dim=1).values + (q * q).sum(dim=1)).clamp_min(0).double()
    return out.numpy()


def patch_distances(bank: np.ndarray, queries: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, L) squared distance of every patch of N images (N, L, d) to its nearest bank row."""
    n, length, dim = queries.shape
    return nearest_sq_distances(bank, queries.reshape(n * length, dim)).reshape(n, length)


def nearest_scores(bank: np.ndarray, queries: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Membership scores (N,) of candidate images (N, L, d) against released vectors (m, d),
    higher = more likely a member: "min", minus the smallest patch distance to the release (a
    member's released patch sits at ~0), and "mean10", minus the mean of its 10 smallest."""
    n, length, _ = queries.shape
    dist = patch_distances(bank, queries)
    return {"min": -dist.min(axis=1), "mean10": -np.sort(dist, axis=1)[:, :min(10, length)].mean(axis=1)}


def attribution_attack(vectors: list[np.ndarray], images: list[np.ndarray] | None = None, seed: int = 0,
                       test_fraction: float = 0.3, max_per_factory: int = 1000) -> dict[str, float]:
    """Can a vector tell which of K factories sent it? An equal number of vectors per factory
    (the smallest count, at most `max_per_factory`), a standardised multinomial logistic
    regression, accuracy on held-out vectors against chance 1/K, for two splits:

    - "accuracy": held-out vectors drawn at random (stratified), so patches of one image sit on
      both sides: it also rewards recognising the image, not only the factory;
    - "accuracy_by_image" (with `images`, each vector's image id): each factory's held-out
      vectors come from images none of its training vectors came from, so only what the
      factory's images share (its camera, lighting, fixture) can carry over."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = len(vectors)
    if k < 2:
        raise ValueError("attribution needs vectors from at least 2 factories")
    rng = np.random.default_rng(seed)
    per = min(min(len(v) for v in vectors), max_per_factory)
    if per < 4:
        raise ValueError(f"attribution needs at least 4 vectors per factory, got {per}")
    picks = [np.sort(rng.choice(len(v), per, replace=False)) for v in vectors]
    x = np.concatenate([np.asarray(v, np.float64)[p] for v, p in zip(vectors, picks)])
    y = np.repeat(np.arange(k), per)

    def score(test: np.ndarray) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(x[~test], y[~test])
        return float((clf.predict(x[test]) == y[test]).mean())

    test = np.zeros(len(y), bool)
    for f in range(k):  # stratified: the same share of every factory's vectors
        mine = np.flatnonzero(y == f)
        test[rng.choice(mine, max(1, int(round(test_fraction * per))), replace=False)] = True
    out = {"accuracy": score(test), "chance": 1.0 / k, "factories": k, "per_factory": per,
           "test_vectors": int(test.sum())}
    if images is not None:
        by_image = np.zeros(len(y), bool)
        for f, (ids, p) in enumerate(zip(images, picks)):
            ids = np.asarray(ids)[p]
            names = np.unique(ids)
            if len(names) < 2:
                return {**out, "accuracy_by_image": float("nan")}
            held = rng.choice(names, max(1, int(round(test_fraction * len(names)))), replace=False)
            by_image[np.flatnonzero(y == f)[np.isin(ids, held)]] = True
        out.update(accuracy_by_image=score(by_image), test_vectors_by_image=int(by_image.sum()))
    return out
