"""Fidelity benchmark against the official PatchCore code itself (amazon-science/patchcore-inspection).

    .venv/bin/python -m experiments.bench.fidelity_official --official OFFICIAL_CHECKOUT \\
        --official-python OFFICIAL_VENV/bin/python [--categories hazelnut tire] [--out DIR] \\
        [--anomalib-python ANOMALIB_VENV/bin/python] [--quirk-ratios 1.0] [--ratios 1.0 0.1]

Both implementations score the same images (data.root of configs/shared_real.yaml, read in place)
with the same backbone file: a seeded WideResNet-50-2 (torchvision wide_resnet50_2(weights=None)
after torch.manual_seed(0); pretrained weights cannot be downloaded here), saved once into the
out dir. Paper settings otherwise: layer2 + layer3, 3x3 patches, 1024 -> 1024, 1-NN, resize 256,
crop 224. fedpatch runs in this process through its public API (PatchCore, score_records); the
official code runs in a subprocess with its own virtualenv (experiments/bench/_official_driver.py,
which never imports fedpatch). Coreset settings: off (every patch in the bank) and 10% (official
ApproximateGreedyCoresetSampler vs fedpatch's default approximate greedy; the random projections
differ, so the picks do too).

Per category and setting it reports: per-image score Pearson and max relative difference, the
anomaly-map Pearson over all pixels of all test images (224 x 224 both), image AUROC and pixel
AUROC of each implementation, pixel AUROC with both mask binarisations (fedpatch: nearest-exact
resize, > 0; official: bilinear resize, `astype(int)`, i.e. only pixels exactly 1.0), the official
run with the BatchNorm quirk of its load() left in, and fedpatch's AUPRO (patchcore/metrics.py)
against anomalib's AUPRO on the same maps and masks (limit 0.3, in anomalib's own virtualenv).
Writes fidelity_official.json and fidelity_official.md into the out dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_official_driver.py")
DEFAULT_OUT = REPO / "results" / "fidelity_official"
DEFAULT_ANOMALIB = os.environ.get("FEDPATCH_ANOMALIB_PYTHON", "")  # "" = the AUPRO check is skipped
WEIGHTS_NAME = "wide_resnet50_2_seed0.pt"
TARGETS = {"score_pearson": 0.99999, "map_pearson": 0.999}

ANOMALIB_AUPRO = """
import json, sys
import numpy as np, torch
from anomalib.metrics.aupro import _AUPRO
out = {}
for name, path in json.loads(sys.argv[1]).items():
    data = np.load(path)
    metric = _AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(data["maps"].astype(np.float32)), torch.from_numpy(data["masks"].astype(np.float32)))
    out[name] = float(metric.compute())
import anomalib
print(json.dumps({"anomalib": anomalib.__version__, "aupro": out}))
"""


# ---------------------------------------------------------------- pure pieces (tested) ----------

def fail(message: str) -> None:
    """Exit with one line on stderr."""
    raise SystemExit(f"fidelity_official: error: {message}")


def check_official(path: str | Path) -> Path:
    """The official checkout's root, or a one-line exit when it has no src/patchcore."""
    root = Path(path).expanduser()
    if not (root / "src" / "patchcore" / "patchcore.py").is_file():
        fail(f"--official {root} has no src/patchcore/patchcore.py (give the root of a "
             "patchcore-inspection checkout)")
    return root.resolve()


def check_python(path: str | Path, flag: str) -> Path:
    """An executable interpreter, or a one-line exit."""
    exe = Path(path).expanduser()
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        fail(f"{flag} {exe} is not an executable python")
    return exe


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two equally long arrays (float64); 1.0 when both are identical
    constants, nan when only one is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{a.size} vs {b.size} values")
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    if na == 0 or nb == 0:
        return 1.0 if na == nb and np.array_equal(a, b) else float("nan")
    return float((da * db).sum() / (na * nb))


def max_relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / |b| over the elements (b: the reference, the official values)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)))


def official_binarise(masks: Any) -> np.ndarray:
    """The official metrics' masks: `astype(int)` of the bilinearly resized [0, 1] float masks,
    so only pixels that are exactly 1.0 count as defective."""
    return np.asarray(masks).astype(int) == 1


def align(reference: Sequence[str], other: Sequence[str]) -> np.ndarray:
    """Index array `idx` with other[idx[i]] == reference[i] (paths compared resolved)."""
    where = {os.path.realpath(str(p)): i for i, p in enumerate(other)}
    missing = [p for p in reference if os.path.realpath(str(p)) not in where]
    if missing or len(reference) != len(other):
        raise ValueError(f"image lists differ: {len(reference)} vs {len(other)}, e.g. missing {missing[:1]}")
    return np.array([where[os.path.realpath(str(p))] for p in reference], dtype=np.int64)


def discordant_pairs(a: Any, b: Any, labels: Any) -> list[tuple[int, int]]:
    """(anomalous i, normal j) pairs that two score vectors order differently (a tie counts as an
    order of its own): exactly the pairs behind a difference of their image AUROCs."""
    a, b, labels = (np.asarray(x).ravel() for x in (a, b, labels))
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    order_a = np.sign(a[pos][:, None] - a[neg][None])
    order_b = np.sign(b[pos][:, None] - b[neg][None])
    return [(int(pos[i]), int(neg[j])) for i, j in np.argwhere(order_a != order_b)]


def compare(fed: dict[str, np.ndarray], off: dict[str, np.ndarray]) -> dict[str, float]:
    """Agreement of two scored test sets in the same image order: fed/off hold `scores` (N,),
    `maps` (N, H, W), `labels` (N,); fed `masks` bool (nearest-exact), off `masks` float
    (bilinear, as the official dataset yields them)."""
    from patchcore.metrics import image_auroc, pixel_auroc

    if not np.array_equal(fed["labels"], off["labels"]):
        raise ValueError("the two implementations label the test images differently")
    nearest, astype_int = fed["masks"].astype(bool), official_binarise(off["masks"])
    return {
        "score_pearson": pearson(fed["scores"], off["scores"]),
        "score_max_rel_diff": max_relative_difference(fed["scores"], off["scores"]),
        "map_pearson": pearson(fed["maps"], off["maps"]),
        "map_max_abs_diff_over_range": float(np.abs(fed["maps"].astype(np.float64) - off["maps"]).max()
                                             / (off["maps"].max() - off["maps"].min())),
        "image_auroc_fedpatch": image_auroc(fed["labels"], fed["scores"]),
        "image_auroc_official": image_auroc(off["labels"], off["scores"]),
        "pixel_auroc_fedpatch_nearest": pixel_auroc(nearest, fed["maps"]),
        "pixel_auroc_official_nearest": pixel_auroc(nearest, off["maps"]),
        "pixel_auroc_fedpatch_astype_int": pixel_auroc(astype_int, fed["maps"]),
        "pixel_auroc_official_astype_int": pixel_auroc(astype_int, off["maps"]),
    }


def mask_counts(fed_masks: np.ndarray, off_masks: np.ndarray) -> dict[str, int]:
    """Defective pixels under each binarisation (fedpatch nearest-exact; official bilinear
    masks thresholded by astype(int) and, for reference, at > 0.5 and > 0)."""
    fed_masks = fed_masks.astype(bool)
    return {"nearest_exact": int(fed_masks.sum()), "astype_int": int(official_binarise(off_masks).sum()),
            "bilinear_gt_0.5": int((off_masks > 0.5).sum()), "bilinear_gt_0": int((off_masks > 0).sum()),
            "nearest_vs_bilinear_gt_0.5_disagree": int((fed_masks != (off_masks > 0.5)).sum())}


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if np.isnan(value):
            return "nan"
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def _r(value: float) -> str:
    """A correlation with its distance to 1: 0.9999999 (2.7e-09)."""
    return "nan" if value is None or np.isnan(value) else f"{value:.7f} ({1.0 - value:.1e})"


def _pair(values: Sequence[float]) -> str:
    return f"{values[0]:.4f} vs {values[1]:.4f}"


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], intro: str = "") -> list[str]:
    """One Markdown section: a title, an optional sentence, the table, a blank line."""
    lines = [f"## {title}", ""] + ([intro, ""] if intro else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _both(c: dict[str, Any], fed: str, off: str, digits: int = 4) -> str:
    return f"{_fmt(c[fed], digits)} / {_fmt(c[off], digits)}"


def _image(path: str) -> str:
    return f"{Path(path).parent.name}/{Path(path).name}"


def markdown_tables(report: dict[str, Any]) -> str:
    """The report's tables as Markdown."""
    comparisons = report["comparisons"]
    out = _table(
        "fedpatch vs official (same images, same weights file)",
        ["category", "coreset", "official backbone", "bank fed / off", "fedpatch 1-NN", "score r",
         "score max rel diff", "map r", "image AUROC fed / off", "pixel AUROC nearest-exact fed / off",
         "pixel AUROC astype(int) fed / off"],
        [[r["category"], r["coreset"], r["official_backbone"], f"{r['bank_fedpatch']} / {r['bank_official']}",
          r.get("fedpatch_nn", "-"), _r(r["metrics"]["score_pearson"]), _fmt(r["metrics"]["score_max_rel_diff"]),
          _r(r["metrics"]["map_pearson"]),
          _both(r["metrics"], "image_auroc_fedpatch", "image_auroc_official"),
          _both(r["metrics"], "pixel_auroc_fedpatch_nearest", "pixel_auroc_official_nearest"),
          _both(r["metrics"], "pixel_auroc_fedpatch_astype_int", "pixel_auroc_official_astype_int")]
         for r in comparisons],
        intro=("Pearson r with 1 − r in brackets; maps over all pixels of all test images (224 × 224). Pixel AUROC "
               "with fedpatch's nearest-exact masks and with the official `astype(int)` of bilinear masks."))
    exact = [r for r in comparisons if "score_max_rel_err_official_vs_own_float64" in r["metrics"]]
    if exact:
        out += _table(
            "Score arithmetic: each side against float64 scores of its own embeddings",
            ["category", "coreset", "fedpatch 1-NN", "fedpatch max rel err", "official (faiss float32) max rel err",
             "float64 fed vs off: max rel diff", "r", "image AUROC of the float64 scores fed / off"],
            [[r["category"], r["coreset"], r.get("fedpatch_nn", ""),
              _fmt(r["metrics"]["score_max_rel_err_fedpatch_vs_own_float64"]),
              _fmt(r["metrics"]["score_max_rel_err_official_vs_own_float64"]),
              _fmt(r["metrics"]["float64_scores_max_rel_diff"]),
              _r(r["metrics"]["float64_scores_pearson"]) if "float64_scores_pearson" in r["metrics"] else "",
              (_both(r["metrics"], "image_auroc_fedpatch_float64", "image_auroc_official_float64")
               if "image_auroc_fedpatch_float64" in r["metrics"] else "")]
             for r in exact])
    if report.get("first_batch"):
        out += _table(
            "Inputs and embeddings of the first test batch",
            ["category", "images", "input max abs diff (uint8 steps)", "input values differing by > 0.5 step",
             "embedding r", "embedding max abs diff / max abs"],
            [[cat, f["images"], _fmt(f["input_max_abs_diff_uint8_steps"], 4),
              _fmt(f["input_share_of_values_differing"]), _r(f["embedding_pearson"]),
              _fmt(f["embedding_max_abs_diff_over_max_abs"])]
             for cat, f in report["first_batch"].items()])
    if report.get("discordant"):
        out += _table(
            "Image pairs the two implementations order differently (coreset off), with float64 scores",
            ["category", "anomalous image", "normal image", "fedpatch", "official", "float64", "agrees with float64"],
            [[cat, _image(p["anomalous"]), _image(p["normal"]), _pair(p["fedpatch"]), _pair(p["official"]),
              _pair(p["float64"]), ", ".join(p["agrees_with_float64"]) or "neither"]
             for cat, d in report["discordant"].items() for p in d["pairs"]])
    if report.get("fedpatch_seeds"):
        off10 = {(r["category"], r["coreset"]): r["metrics"] for r in comparisons
                 if r["official_backbone"] == "BN restored"}
        rows = [[cat, name, ", ".join(_fmt(v["image_auroc"], 4) for v in seeds.values()),
                 _fmt(off10.get((cat, name), {}).get("image_auroc_official"), 4),
                 ", ".join(_fmt(v["pixel_auroc"], 4) for v in seeds.values()),
                 _fmt(off10.get((cat, name), {}).get("pixel_auroc_official_nearest"), 4)]
                for cat, per in report["fedpatch_seeds"].items() for name, seeds in per.items()]
        if rows:
            seeds = next(iter(next(iter(report["fedpatch_seeds"].values())).values()), {})
            out += _table(f"Coreset runs: fedpatch seeds {', '.join(map(str, seeds))} vs the official run (seed 0)",
                          ["category", "coreset", "fedpatch image AUROC", "official image AUROC",
                           "fedpatch pixel AUROC", "official pixel AUROC"], rows)
    if report.get("aupro"):
        out += _table(
            (f"AUPRO (limit 0.3): fedpatch patchcore/metrics.py vs anomalib {report.get('anomalib_version', '?')}, "
             "same maps and nearest-exact masks"),
            ["category", "coreset", "maps of", "fedpatch AUPRO", "anomalib AUPRO", "difference"],
            [[a["category"], a["coreset"], a["maps"], _fmt(a["fedpatch"]), _fmt(a["anomalib"]),
              _fmt(None if a["anomalib"] is None else a["fedpatch"] - a["anomalib"])] for a in report["aupro"]])
    if report.get("masks"):
        out += _table(
            "Defective pixels of the test masks per binarisation",
            ["category", "nearest-exact (fedpatch)", "astype(int) (official)", "bilinear > 0.5", "bilinear > 0",
             "nearest vs bilinear > 0.5 disagree"],
            [[cat, m["nearest_exact"], m["astype_int"], m["bilinear_gt_0.5"], m["bilinear_gt_0"],
              m["nearest_vs_bilinear_gt_0.5_disagree"]] for cat, m in report["masks"].items()])
    if report.get("bn_drift"):
        out += _table(
            "BatchNorm drift of the official load() (train-mode forward of a constant image)",
            ["category", "BN layers moved", "max abs running_mean change", "max abs running_var change",
             "num_batches_tracked +", "conv weights unchanged"],
            [[cat, f"{d['bn_layers_moved']} of {d['bn_layers']}", _fmt(d["max_abs_running_mean_change"], 4),
              _fmt(d["max_abs_running_var_change"], 4), d["num_batches_tracked_increase"], d["weights_unchanged"]]
             for cat, d in report["bn_drift"].items()])
    if report.get("official_reported"):
        out += _table(
            "The official evaluation itself (bin/run_patchcore.py's metrics on min-max normalised outputs)",
            ["category", "coreset", "official backbone", "instance AUROC", "full pixel AUROC", "anomaly pixel AUROC"],
            [[r["category"], r["coreset"], r["official_backbone"], _fmt(r["instance_auroc"], 4),
              _fmt(r["full_pixel_auroc"], 4), _fmt(r["anomaly_pixel_auroc"], 4)] for r in report["official_reported"]])
    return "\n".join(out)


# ---------------------------------------------------------------- runs ----------------------------

def save_weights(out: Path) -> Path:
    """The seeded WideResNet-50-2 state dict, written once into `out`."""
    import torch
    import torchvision

    path = out / WEIGHTS_NAME
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = torchvision.models.wide_resnet50_2(weights=None).state_dict()
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    return path


def c_differs(metrics: dict[str, float]) -> bool:
    """Whether the two implementations' image AUROCs differ."""
    return metrics["image_auroc_fedpatch"] != metrics["image_auroc_official"]


def setting_name(ratio: float) -> str:
    return "off" if ratio >= 1.0 else f"{ratio:g}"


def exact_image_scores(model: Any, loader: Any, bank: Any) -> np.ndarray:
    """float64 image scores of fedpatch's own embeddings: max over patches of the squared distance
    to the nearest bank row, without the bf16 search (the reference its scores should equal)."""
    import torch

    bank = bank.double()
    bank_sq = (bank * bank).sum(1)
    out = []
    for batch in loader:
        emb, _ = model.embed(batch["image"])  # (B, L, D)
        feats = emb.reshape(-1, emb.shape[-1]).double()
        mins = [((x * x).sum(1, keepdim=True) + bank_sq[None] - 2 * x @ bank.T).min(1).values
                for x in feats.split(2048)]
        out.append(torch.cat(mins).reshape(len(emb), -1).max(1).values.numpy())
    return np.concatenate(out)


def piece_path(store: Path, category: str, name: str) -> Path:
    """Where a finished piece lives (its .npz and .json swap the ".piece", never the ".1" of "0.1")."""
    return store / f"{category}_{name}.piece"


def _save_piece(path: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """One finished piece of a run (arrays + JSON meta), written so that --reuse can pick it up."""
    np.savez(path.with_suffix(".tmp.npz"), **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(path.with_suffix(".tmp.npz"), path.with_suffix(".npz"))
    path.with_suffix(".json").write_text(json.dumps(meta, default=float))


def _load_piece(path: Path) -> dict[str, Any] | None:
    if not (path.with_suffix(".npz").is_file() and path.with_suffix(".json").is_file()):
        return None
    with np.load(path.with_suffix(".npz")) as data:
        piece = {k: data[k] for k in data.files}
    piece.update(json.loads(path.with_suffix(".json").read_text()))
    return piece


def _complete(piece: dict[str, Any], name: str, exact: bool, seeds: Sequence[int]) -> bool:
    """Whether a saved piece has what this run asks for (exact scores, every coreset seed)."""
    if name == "first_batch":
        return True
    if exact and "exact_scores" not in piece:
        return False
    return name == "off" or {str(s) for s in seeds} <= set(piece.get("seed_metrics", {}))


def run_fedpatch(config_path: Path, data_root: str, category: str, weights: Path, ratios: Sequence[float],
                 batch_size: int, exact: bool = False, seeds: Sequence[int] = (0,),
                 off_nn_backend: str = "default", store: Path | None = None, reuse: bool = False) -> dict[str, Any]:
    """fedpatch through its public API: one extraction, one bank per coreset setting; coreset
    settings are also drawn with every seed in `seeds` (image/pixel AUROC only).

    `off_nn_backend` "faiss": the coreset-off bank is searched with fedpatch's `nn_backend: faiss`
    (exact flat index) instead of the default torch search (bf16 products + exact re-ranking),
    whose prefilter prunes almost nothing on the random-weight tire bank (study: 33 s per image).
    Each finished setting is saved under `store`; with `reuse`, saved settings are loaded instead
    of recomputed (the backbone runs only when something is missing)."""
    import torch

    from federated.config import ExperimentConfig
    from patchcore.backbones import IMAGENET_MEAN, IMAGENET_STD
    from patchcore.config import load_config
    from patchcore.data.sources import load_records
    from patchcore.evaluation import loader_for, score_records
    from patchcore.model import PatchCore, subsample

    out: dict[str, Any] = {"seeds": {}}

    def path_of(name: str) -> Path:
        return piece_path(store, category, name)

    exact_missing: dict[str, Any] = {}  # a saved coreset-off piece that only lacks its float64 scores
    if reuse and store:
        for name in ["first_batch", *map(setting_name, ratios)]:
            piece = _load_piece(path_of(name))
            if piece is not None and name == "off" and exact and "exact_scores" not in piece:
                exact_missing[name] = piece
                continue
            if piece is None or not _complete(piece, name, exact, seeds):
                continue
            out[name] = piece
            if "seed_metrics" in piece:
                out["seeds"][name] = piece["seed_metrics"]
            print(f"fedpatch {category} {name}: reused {path_of(name).with_suffix('.npz')}", flush=True)
    missing = [r for r in ratios if setting_name(r) not in out and setting_name(r) not in exact_missing]
    if not missing and not exact_missing and "first_batch" in out:
        return out

    config = load_config(config_path, ExperimentConfig, {
        "data.root": data_root, "data.categories": [category], "data.batch_size": batch_size, "device": "cpu",
        "model.backbone": {"name": "wide_resnet50_2", "layers": ["layer2", "layer3"], "weights": str(weights)},
        "model.coreset.ratio": 0.1})
    records = load_records(config.data, Path(data_root), category)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    model = PatchCore(config.model, device="cpu", seed=config.seed)
    if "first_batch" not in out:
        # the official loader's first batch: its test images come sorted by defect folder, then file name
        first = sorted(test, key=lambda r: str(r.path))[:batch_size]
        batch = next(iter(loader_for(first, config)))
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out["first_batch"] = {  # what the backbone sees (normalised) and the patch embeddings
            "images": ((batch["image"] - mean) / std).numpy(), "embeddings": model.embed(batch["image"])[0].numpy(),
            "paths": [str(r.path) for r in first]}
        if store:
            _save_piece(path_of("first_batch"), out["first_batch"], {})
    if not missing and not exact_missing:
        return out
    start = time.perf_counter()
    features = model.extract(loader_for(train, config), progress=False)
    extract_s = time.perf_counter() - start
    for name, piece in exact_missing.items():  # the float64 scores only: the saved search is kept
        start = time.perf_counter()
        arrays = {k: piece[k] for k in ("scores", "maps", "masks", "labels", "paths")}
        arrays["exact_scores"] = exact_image_scores(model, loader_for(test, config), features)
        meta = {k: v for k, v in piece.items() if k not in arrays}
        print(f"fedpatch {category} {name}: float64 scores added to the saved run in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if store:
            _save_piece(path_of(name), arrays, meta)
        out[name] = {**arrays, **meta}
    for ratio in missing:
        name = setting_name(ratio)
        start = time.perf_counter()
        bank = features if ratio >= 1.0 else model.subsample(features, ratio=ratio, progress=False)
        coreset_s = time.perf_counter() - start
        model.set_bank(bank)
        nn = "torch (default: bf16 products + exact re-ranking)" if model.bank.uses_bf16() else model.bank.nn_backend
        if ratio >= 1.0 and off_nn_backend == "faiss":
            model.bank.set_backend("faiss")
            nn = "faiss (IndexFlatL2)"
        scored = score_records(model, test, config, progress=False)
        piece = {"scores": scored.scores.astype(np.float64), "maps": scored.maps, "masks": scored.masks,
                 "labels": scored.labels, "paths": np.asarray([str(r.path) for r in test])}
        meta: dict[str, Any] = {"bank": len(bank), "nn": nn, "seconds": extract_s + time.perf_counter() - start,
                                "extract_s": extract_s, "coreset_s": coreset_s}
        print(f"fedpatch {category} coreset {name}: bank {len(bank)}, NN {nn}, coreset {coreset_s:.0f} s, "
              f"{meta['seconds']:.0f} s with the extraction", flush=True)
        if exact:
            piece["exact_scores"] = exact_image_scores(model, loader_for(test, config), bank)
        if ratio < 1.0:
            m = scored.metrics()
            meta["seed_metrics"] = {str(config.seed): {"image_auroc": m["image_auroc"],
                                                       "pixel_auroc": m["pixel_auroc"]}}
            for seed in (s for s in seeds if s != config.seed):
                model.set_bank(subsample(features, config.model, seed, ratio))
                m = score_records(model, test, config, progress=False).metrics()
                meta["seed_metrics"][str(seed)] = {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"]}
            out["seeds"][name] = meta["seed_metrics"]
            print(f"fedpatch {category} coreset {name} seeds {list(meta['seed_metrics'])}: image AUROC "
                  + ", ".join(f"{v['image_auroc']:.4f}" for v in meta["seed_metrics"].values()), flush=True)
        if store:
            _save_piece(path_of(name), piece, meta)
        out[name] = {**piece, **meta}
    return out


def float64_scores_of(config_path: Path, data_root: str, category: str, weights: Path, batch_size: int,
                      paths: Sequence[str]) -> dict[str, float]:
    """float64 image scores (fedpatch embeddings, 1-NN over the whole training bank) of the test
    images at `paths`: the arbiter of pairs whose order the two float32 searches disagree on."""
    from federated.config import ExperimentConfig
    from patchcore.config import load_config
    from patchcore.data.sources import load_records
    from patchcore.evaluation import loader_for
    from patchcore.model import PatchCore

    config = load_config(config_path, ExperimentConfig, {
        "data.root": data_root, "data.categories": [category], "data.batch_size": batch_size, "device": "cpu",
        "model.backbone": {"name": "wide_resnet50_2", "layers": ["layer2", "layer3"], "weights": str(weights)}})
    records = load_records(config.data, Path(data_root), category)
    wanted = {os.path.realpath(p) for p in paths}
    chosen = [r for r in records if r.split == "test" and os.path.realpath(str(r.path)) in wanted]
    model = PatchCore(config.model, device="cpu", seed=config.seed)
    bank = model.extract(loader_for([r for r in records if r.split == "train"], config), progress=False)
    scores = exact_image_scores(model, loader_for(chosen, config), bank)
    return {str(r.path): float(v) for r, v in zip(chosen, scores)}


def check_discordant(fed: dict[str, Any], off: dict[str, Any], exact: dict[str, float]) -> dict[str, Any]:
    """Every discordant pair with both implementations' scores and the float64 ones."""
    paths = [str(p) for p in fed["paths"]]
    rows = []
    for i, j in discordant_pairs(fed["scores"], off["scores"], fed["labels"]):
        row = {"anomalous": paths[i], "normal": paths[j]}
        for side, s in (("fedpatch", fed["scores"]), ("official", off["scores"]),
                        ("float64", np.array([exact.get(p, np.nan) for p in paths]))):
            row[side] = [float(s[i]), float(s[j])]
        truth = np.sign(row["float64"][0] - row["float64"][1])
        row["agrees_with_float64"] = [side for side in ("fedpatch", "official")
                                      if np.sign(row[side][0] - row[side][1]) == truth]
        rows.append(row)
    return {"pairs": rows, "num_pairs": len(rows),
            "num_positive_x_negative": int((fed["labels"] == 1).sum() * (fed["labels"] == 0).sum()),
            "max_relative_gap": max((abs(r[k][0] - r[k][1]) / min(r[k]) for r in rows
                                     for k in ("fedpatch", "official")), default=0.0)}


def compare_first_batch(fed: dict[str, Any], off_path: Path) -> dict[str, float]:
    """The two preprocessings and embeddings of the same first test images."""
    from patchcore.backbones import IMAGENET_STD

    with np.load(off_path) as off:
        idx = align(fed["paths"], list(off["paths"]))
        images, emb = off["images"][idx], off["embeddings"][idx]
    diff = np.abs(fed["images"] - images)  # normalised units; x 255 x std = uint8 steps
    steps = diff * 255.0 * np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    return {"images": len(idx), "input_max_abs_diff_uint8_steps": float(steps.max()),
            "input_share_of_values_differing": float((steps > 0.5).mean()),
            "embedding_pearson": pearson(fed["embeddings"], emb),
            "embedding_max_abs_diff_over_max_abs": float(np.abs(fed["embeddings"].astype(np.float64) - emb).max()
                                                         / np.abs(emb).max())}


def run_official(python: Path, official: Path, data_root: str, category: str, weights: Path, ratios: Sequence[float],
                 out: Path, keep_quirk: bool, batch_size: int, log: Path, extra: Sequence[str] = (),
                 reuse: bool = False) -> dict[str, Any]:
    """The official code in its own interpreter; returns its summary with the arrays loaded (only
    the requested settings). With --reuse (`reuse`), settings already saved in `out` are kept."""
    summary_path = out / f"{category}_summary.json"

    def saved(ratio: float) -> bool:
        npz = out / f"{category}_{setting_name(ratio)}.npz"
        if not (summary_path.is_file() and npz.is_file()):
            return False
        if setting_name(ratio) not in json.loads(summary_path.read_text())["settings"]:
            return False
        with np.load(npz) as data:
            return "--exact" not in extra or "exact_scores" in data.files

    missing = [r for r in ratios if not (reuse and saved(r))]
    first_missing = "--first-batch" in extra and not (reuse and (out / f"{category}_first_batch.npz").is_file())
    if missing or first_missing:
        cmd = [str(python), str(DRIVER), "--official", str(official), "--data-root", data_root, "--category",
               category, "--weights", str(weights), "--out", str(out), "--batch-size", str(batch_size),
               "--ratios", *[str(r) for r in missing]] + (["--keep-bn-quirk"] if keep_quirk else []) + list(extra)
        env = {**os.environ, "PYTHONPATH": ""}  # nothing of this repo on the official interpreter's path
        with open(log, "a") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=handle, text=True, env=env,
                                  cwd=tempfile.gettempdir())
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            fail(f"the official driver failed for {category} (exit {proc.returncode}); see {log}")
    else:
        print(f"official {category} ({'BN quirk kept' if keep_quirk else 'BN restored'}): reused {out}", flush=True)
    summary = json.loads(summary_path.read_text())
    summary["settings"] = {setting_name(r): summary["settings"][setting_name(r)] for r in ratios}
    for name in summary["settings"]:
        with np.load(out / f"{category}_{name}.npz") as data:
            summary["settings"][name].update({k: data[k] for k in data.files})
    return summary


def anomalib_aupro(python: Path, inputs: dict[str, Path]) -> tuple[str, dict[str, float]]:
    """anomalib's AUPRO (fpr_limit 0.3) of each saved (maps, masks) npz, in anomalib's venv."""
    proc = subprocess.run([str(python), "-c", ANOMALIB_AUPRO, json.dumps({k: str(v) for k, v in inputs.items()})],
                          check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"anomalib AUPRO failed: {tail}", file=sys.stderr)
        return "failed", {}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["anomalib"], result["aupro"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fidelity_official", description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="root of a patchcore-inspection checkout (has src/patchcore)")
    parser.add_argument("--official-python", required=True,
                        help="python of a venv with the official code's dependencies")
    parser.add_argument("--categories", nargs="+", default=["hazelnut", "tire"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shared_real.yaml")
    parser.add_argument("--data-root", default=None, help="default: the config's data.root, relative to the repo")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.1], help="coreset settings (1.0 = off)")
    parser.add_argument("--coreset-categories", nargs="*", default=["hazelnut"],
                        help="categories also run with the coreset settings below 1.0 (tire's 10%% coreset costs "
                             "over half an hour per side on 2 cores; the must-shows are coreset-off)")
    parser.add_argument("--quirk-ratios", type=float, nargs="*", default=[1.0],
                        help="settings also run with the official BatchNorm quirk left in")
    parser.add_argument("--anomalib-python", default=DEFAULT_ANOMALIB,
                        help="python of a venv with anomalib (default: $FEDPATCH_ANOMALIB_PYTHON; "
                             "none: the AUPRO check is skipped)")
    parser.add_argument("--exact-categories", nargs="*", default=["hazelnut", "tire"],
                        help="categories whose coreset-off image scores are also recomputed in float64 from "
                             "each side's own embeddings (the arbiter of float32 search error)")
    parser.add_argument("--default-nn-categories", nargs="*", default=["hazelnut"],
                        help="categories whose coreset-off bank fedpatch searches with its default 1-NN")
    parser.add_argument("--off-nn-backend", choices=["faiss", "default"], default="faiss",
                        help="fedpatch's 1-NN for the coreset-off bank of the other categories (default: "
                             "faiss, fedpatch's flat-index backend; 'default': the torch bf16 search, whose "
                             "prefilter prunes almost nothing on the random-weight tire bank: ~33 s per image)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="fedpatch coreset seeds (the spread the official 10%% run is read against)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a WideResNet-50-2 state-dict file for both sides (e.g. torchvision's ImageNet "
                             "weights); default: a seeded random one saved into --out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the per-setting results an earlier run saved in --out (same weights file)")
    args = parser.parse_args(argv)

    official = check_official(args.official)
    official_python = check_python(args.official_python, "--official-python")
    anomalib_python = Path(args.anomalib_python) if args.anomalib_python else None
    if anomalib_python is not None and not (anomalib_python.is_file() and os.access(anomalib_python, os.X_OK)):
        print(f"no anomalib interpreter at {anomalib_python}: the AUPRO check is skipped", file=sys.stderr)
        anomalib_python = None
    if not args.config.is_file():
        fail(f"--config {args.config} not found")
    if args.weights is not None and not args.weights.is_file():
        fail(f"--weights {args.weights} not found")
    if args.data_root is None:
        import yaml

        root = (yaml.safe_load(args.config.read_text()) or {}).get("data", {}).get("root", "")
        args.data_root = str((REPO / root).resolve()) if root and not os.path.isabs(root) else root
    for category in args.categories:
        if not (Path(args.data_root) / category / "test").is_dir():
            fail(f"no {category}/test under {args.data_root}")

    import torch

    from patchcore.metrics import image_auroc

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = args.out.resolve()
    (out / "official").mkdir(parents=True, exist_ok=True)
    (out / "arrays").mkdir(parents=True, exist_ok=True)
    (out / "fedpatch").mkdir(parents=True, exist_ok=True)
    weights = args.weights.resolve() if args.weights is not None else save_weights(out)
    log = out / "official.log"
    if not args.reuse:
        log.write_text("")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "official": str(official), "official_commit": _git_head(official), "weights": str(weights),
        "data_root": args.data_root, "targets": TARGETS, "comparisons": [], "aupro": [], "masks": {},
        "bn_drift": {}, "official_reported": [], "timings_s": {},
        "first_batch": {}, "fedpatch_seeds": {}, "discordant": {}}
    aupro_inputs: dict[str, Path] = {}
    for category in args.categories:
        exact = category in args.exact_categories
        ratios = [r for r in args.ratios if r >= 1.0 or category in args.coreset_categories]
        off_nn = "default" if category in args.default_nn_categories else args.off_nn_backend
        fed = run_fedpatch(args.config, args.data_root, category, weights, ratios, args.batch_size,
                           exact=exact, seeds=args.seeds, off_nn_backend=off_nn,
                           store=out / "fedpatch", reuse=args.reuse)
        report["fedpatch_seeds"][category] = fed["seeds"]
        variants = [("BN restored", False, ratios)]
        if args.quirk_ratios:
            variants.append(("BN quirk kept", True, args.quirk_ratios))
        for label, keep, variant_ratios in variants:
            sub = out / "official" / ("bn_quirk" if keep else "bn_restored")
            extra = [] if keep else ["--first-batch"] + (["--exact"] if exact else [])
            summary = run_official(official_python, official, args.data_root, category, weights, variant_ratios, sub,
                                   keep, args.batch_size, log, extra, reuse=args.reuse)
            report["bn_drift"][category] = summary["bn_drift_after_load"]
            if not keep:
                report["first_batch"][category] = compare_first_batch(fed["first_batch"],
                                                                      sub / f"{category}_first_batch.npz")
            for name, off in summary["settings"].items():
                f = fed[name]
                idx = align(f["paths"], list(off["paths"]))
                off_aligned = {k: off[k][idx] for k in ("scores", "maps", "masks", "labels")}
                metrics = compare(f, off_aligned)
                if "exact_scores" in f and "exact_scores" in off:
                    metrics["score_max_rel_err_fedpatch_vs_own_float64"] = max_relative_difference(
                        f["scores"], f["exact_scores"])
                    metrics["score_max_rel_err_official_vs_own_float64"] = max_relative_difference(
                        off["scores"], off["exact_scores"])
                    metrics["float64_scores_max_rel_diff"] = max_relative_difference(
                        f["exact_scores"], off["exact_scores"][idx])
                    metrics["float64_scores_pearson"] = pearson(f["exact_scores"], off["exact_scores"][idx])
                    metrics["image_auroc_fedpatch_float64"] = image_auroc(f["labels"], f["exact_scores"])
                    metrics["image_auroc_official_float64"] = image_auroc(f["labels"], off["exact_scores"][idx])
                row = {"category": category, "coreset": name, "official_backbone": label,
                       "bank_fedpatch": f["bank"], "bank_official": off["bank_size"], "fedpatch_nn": f["nn"],
                       "metrics": metrics,
                       "seconds_fedpatch": f["seconds"], "seconds_official": off["total_s"]}
                report["comparisons"].append(row)
                report["official_reported"].append({"category": category, "coreset": name, "official_backbone": label,
                                                    **{k: off[k] for k in ("instance_auroc", "full_pixel_auroc",
                                                                           "anomaly_pixel_auroc")}})
                if not keep and name == "off" and c_differs(metrics):
                    pairs = discordant_pairs(f["scores"], off_aligned["scores"], f["labels"])
                    paths = sorted({str(f["paths"][k]) for pair in pairs for k in pair})
                    print(f"  {category} off: image AUROC differs on {len(pairs)} pairs; float64 scores of "
                          f"{len(paths)} images...", flush=True)
                    exact_of = float64_scores_of(args.config, args.data_root, category, weights, args.batch_size, paths)
                    report["discordant"][category] = check_discordant(f, off_aligned, exact_of)
                if not keep:
                    report["masks"][category] = mask_counts(f["masks"], off_aligned["masks"])
                    for who, maps in (("fedpatch", f["maps"]), ("official", off_aligned["maps"])):
                        path = out / "arrays" / f"{category}_{name}_{who}.npz"
                        np.savez(path, maps=maps.astype(np.float32), masks=f["masks"].astype(np.uint8))
                        aupro_inputs[f"{category}|{name}|{who}"] = path
                c = metrics
                print(f"  {category} {name} [{label}]: score r {c['score_pearson']:.7f}, "
                      f"max rel {c['score_max_rel_diff']:.2e}, "
                      f"map r {c['map_pearson']:.7f}, image AUROC {c['image_auroc_fedpatch']:.4f} / "
                      f"{c['image_auroc_official']:.4f}", flush=True)
        report["timings_s"][category] = time.perf_counter() - started
    if aupro_inputs:
        from patchcore.metrics import aupro

        version, independent = (anomalib_aupro(anomalib_python, aupro_inputs) if anomalib_python
                                else ("not run", {}))
        report["anomalib_version"] = version
        for key, path in aupro_inputs.items():
            category, name, who = key.split("|")
            with np.load(path) as data:
                ours = aupro(data["masks"].astype(bool), data["maps"], fpr_limit=0.3)
            report["aupro"].append({"category": category, "coreset": name, "maps": who, "fedpatch": ours,
                                    "anomalib": independent.get(key)})
    report["total_s"] = time.perf_counter() - started
    (out / "fidelity_official.json").write_text(json.dumps(report, indent=2, default=float))
    md = markdown_tables(report)
    title = f"# Fidelity vs the official PatchCore ({report['official_commit'][:12]})"
    (out / "fidelity_official.md").write_text(f"{title}\n\n{md}\n")
    print("\n" + md)
    print(f"wrote {out / 'fidelity_official.json'} and {out / 'fidelity_official.md'} ({report['total_s']:.0f} s)")
    return 0


def _git_head(path: Path) -> str:
    """The checkout's commit when it is a git work tree, else the VERSION file, else '?'."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        version = path / "src" / "patchcore" / "VERSION"
        return version.read_text().strip() if version.is_file() else "?"


if __name__ == "__main__":
    sys.exit(main())
