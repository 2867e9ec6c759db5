"""The privacy audit's pictures and report: picture grids of true vs decoded patches, a mosaic of
what the server can paint of one training image, and report.md (experiments/app/audit.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from federated.audit.attacks import cell_offsets  # noqa: E402
from federated.audit.releases import FactoryData  # noqa: E402

CELL = 32  # pixels a window is drawn at in the grids
GAP = 2


def _canvas(rows: list[np.ndarray]) -> np.ndarray:
    """rows of (n, w, w, 3) windows in [0, 1] -> one white-gapped RGB canvas, nearest upscaling."""
    n = max(len(r) for r in rows)
    height = len(rows) * (CELL + GAP) + GAP
    width = n * (CELL + GAP) + GAP
    canvas = np.ones((height, width, 3), np.float32)
    for i, row in enumerate(rows):
        for j, win in enumerate(row):
            factor = CELL // win.shape[0]
            big = np.kron(np.clip(win, 0, 1), np.ones((factor, factor, 1)))
            y, x = GAP + i * (CELL + GAP), GAP + j * (CELL + GAP)
            canvas[y:y + big.shape[0], x:x + big.shape[1]] = big
    return canvas


def save_compact(fig: "plt.Figure", path: Path, dpi: int) -> Path:
    """Save, then re-encode with an adaptive 256-colour palette: a third of the bytes, no
    visible change at these sizes (reports and the study keep several of them)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    with Image.open(path) as image:
        compact = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    compact.save(path, optimize=True)
    return path


def inversion_grid(shown: Sequence[dict[str, Any]], path: Path, count: int, seed: int, title: str = "") -> Path:
    """One picture: a row of true windows and, under it, what each setting's release decodes to
    for the same patches (where the setting released them); a setting that released other
    patches (another coreset, or per-position means) gets its own true row. `shown`, per
    setting: "setting", "by" (attacker, decoder), "ids" (patch rows or positions), "aggregate",
    "true" and "decoded" windows (n, w, w, 3)."""
    rng = np.random.default_rng(seed)
    patches = [s for s in shown if not s["aggregate"]]
    reference = next((s for s in patches if s["setting"] == "fp16"), (patches or list(shown))[0])
    ids = reference["ids"]
    sample = ids[np.sort(rng.choice(len(ids), min(count, len(ids)), replace=False))]
    rows, labels, common = [], [], []
    for s in patches:
        where = {int(v): k for k, v in enumerate(s["ids"])}
        if all(int(v) in where for v in sample):
            common.append((s, [where[int(v)] for v in sample]))
    if common:
        rows.append(common[0][0]["true"][common[0][1]])
        labels.append("true (released patches)")
        for s, at in common:
            decoded = s["decoded"][at]
            same = next((i for i in range(1, len(rows)) if np.array_equal(rows[i], decoded)), None)
            if same is not None:  # identical output (e.g. fp32 and fp16): one row, both names
                labels[same] = f"{s['setting']} = {labels[same]}"
                continue
            rows.append(decoded)
            labels.append(f"{s['setting']} ({s['by']})")
    for s in shown:
        if any(s is c[0] for c in common):
            continue
        pick = np.sort(rng.choice(len(s["ids"]), min(count, len(s["ids"])), replace=False))
        rows += [s["true"][pick], s["decoded"][pick]]
        kind = "mean at position" if s["aggregate"] else "its own patches"
        labels += [f"true ({s['setting']}: {kind})", f"{s['setting']} ({s['by']})"]
    canvas = _canvas(rows)
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 60 + 2.6, canvas.shape[0] / 60 + 0.4))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([GAP + i * (CELL + GAP) + CELL / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)
    return save_compact(fig, path, dpi=90)


def paint(image_shape: tuple[int, int], grid: tuple[int, int], window: int, cells: np.ndarray,
          windows: np.ndarray) -> np.ndarray:
    """A grey (H, W, 3) canvas with each window (n, w, w, 3) pasted at its grid cell (n,)."""
    height, width = image_shape
    canvas = np.full((height, width, 3), 0.5, np.float32)
    top, left = cell_offsets((height, width), grid, window)
    for cell, win in zip(cells, windows):
        i, j = divmod(int(cell), grid[1])
        y0, x0 = top[i], left[j]
        ys, xs = slice(max(y0, 0), min(y0 + window, height)), slice(max(x0, 0), min(x0 + window, width))
        canvas[ys, xs] = win[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return canvas


def mosaic(victim: FactoryData, released: dict[str, tuple[np.ndarray, np.ndarray]], window: int,
           path: Path, panels: int = 10) -> Path:
    """What the server can paint of one training image (the one with the most released patches
    in fp16): the image, its released patches' true pixels, then each setting's decoded
    patches at their places (grey: not released)."""
    length = victim.grid[0] * victim.grid[1]
    reference = released.get("fp16") or next(iter(released.values()))
    image = int(np.bincount(reference[0] // length, minlength=victim.num_images).argmax())
    true_image = victim.images[image].astype(np.float32) / 255.0
    shape = true_image.shape[:2]
    from federated.audit.attacks import patch_windows

    mine = reference[0][reference[0] // length == image]
    pictures = [("training image", true_image),
                (f"its {len(mine)} released patches", paint(shape, victim.grid, window, mine % length,
                                                            patch_windows(victim.images, victim.grid, window, mine)))]
    shown: list[tuple[str, np.ndarray]] = []
    for label, (rows, decoded) in released.items():
        keep = rows // length == image
        picture = paint(shape, victim.grid, window, rows[keep] % length, decoded[keep])
        same = next((i for i, (_, p) in enumerate(shown) if np.array_equal(p, picture)), None)
        if same is not None:  # identical to an earlier setting's (fp32 and fp16): one panel
            shown[same] = (f"{shown[same][0]} = {label}", shown[same][1])
        else:
            shown.append((label, picture))
    pictures += [(f"decoded: {label}", picture) for label, picture in shown[:panels]]
    columns = min(len(pictures), 5)
    lines = -(-len(pictures) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.0 * columns, 3.2 * lines), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, picture) in zip(axes.ravel(), pictures):
        ax.imshow(np.clip(picture, 0, 1), interpolation="nearest")
        ax.set_title(label, fontsize=7)
    return save_compact(fig, path, dpi=80)


def _cell(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def inversion_pivot(rows: list[dict[str, Any]], category: str) -> str:
    """Per setting and attacker: the best decoder's PSNR (SSIM), and the attacker's mean patch."""
    mine = [r for r in rows if r["category"] == category]
    attackers = list(dict.fromkeys(r["attacker"] for r in mine))
    body = []
    for setting in dict.fromkeys(r["setting"] for r in mine):
        here = [r for r in mine if r["setting"] == setting]
        cells = [setting, str(here[0]["vectors"])]
        for a in attackers:
            best = max((r for r in here if r["attacker"] == a), key=lambda r: r["psnr"])
            cells.append(f"**{_cell(best['psnr'], 1)}** ({_cell(best['ssim'], 2)}) {best['decoder']} vs "
                         f"{_cell(best['psnr_baseline'], 1)} ({_cell(best['ssim_baseline'], 2)}): "
                         f"{best['gain_db']:+.1f} dB")
        body.append(cells)
    return _table(["setting", "vectors", *[f"{a}: decoded vs mean patch, PSNR dB (SSIM)" for a in attackers]], body)


def write_report(path: Path, config: Any, args: argparse.Namespace, tables: dict[str, list[dict[str, Any]]],
                 metas: list[dict[str, Any]], figures: list[Path]) -> Path:
    f = config.federation
    out = [f"# Privacy audit: what the server learns from factory-{args.factory}'s upload", "",
           f"Config: `{args.config}`; {f.num_factories} factories ({f.partition}, domain shift "
           f"{'on' if f.domain_shift else 'off'}), backbone {config.model.backbone.name}, local coreset "
           f"{f.local:g}. Each setting's payload is built by the site's own code (transform, local coreset, "
           f"`make_payload`: clip + noise + encoding, the train reply's records) and decoded as the server "
           f"decodes it; the attacks see only those vectors (the audit alone knows which image patch each came "
           f"from). Inversion: decoders ({', '.join(args.decoder)}) trained on the attacker's own images, never "
           f"the victim's, from an embedding to the {args.window}x{args.window} pixel window centred on its grid "
           f"cell; PSNR in dB (SSIM) on [0, 1] pixels, averaged over the released vectors, the best decoder "
           f"against the attacker's *mean patch* (a decoder that learnt nothing). Membership: the victim's "
           f"training images vs as many unseen normal images of the product through the victim's camera; AUROC "
           f"with a bootstrap 95% interval; TPR at 1% FPR is the TPR at FPR 0 when there are under 100 "
           f"non-members. Attribution: logistic regression from a vector to its factory (every factory's "
           f"release under the setting), accuracy vs chance, on held-out vectors (patches of an image on both "
           f"sides) and on held-out images (only what a factory's images share carries over).", ""]
    for meta in metas:
        c = meta["category"]
        out += [f"## {c} (victim {meta['victim']}: {meta['victim_images']} training images, grid "
                f"{meta['grid'][0]}x{meta['grid'][1]}; clip radius {meta['clip_norm']:.4g})", "",
                "Attacker images: " + ", ".join(f"{k} {v}" for k, v in meta["attackers"].items()) +
                f". Membership: {meta['candidates']['members']} members vs {meta['candidates']['nonmembers']} "
                "non-members (" + ", ".join(f"{k}: {v}" for k, v in meta["candidates"]["nonmember_sources"].items())
                + ").", "",
                "### What the server receives", "",
                f"Detection AUROC: the {meta['test_images']['good']} good and {meta['test_images']['defective']} "
                f"defective test images of every factory, through the victim's camera, scored with this release "
                f"alone as the model (what the upload is for; a global bank pools every factory's).", "",
                _table(["setting", "kind", "vectors", "dim", "bytes", "noise", "encoding", "detection AUROC"],
                       [[r["setting"], r["kind"], str(r["vectors"]), str(r["dim"]), f"{r['bytes']:,}",
                         r["noise"], r["encoding"], _cell(r["detection_auroc"])]
                        for r in tables["releases"] if r["category"] == c]),
                "", "### Inversion", "", inversion_pivot(tables["inversion"], c), "",
                "### Membership", "",
                _table(["setting", "statistic", "AUROC [95% CI]", "TPR @ 1% FPR"],
                       [[r["setting"], r["statistic"], f"{_cell(r['auroc'])} [{_cell(r['auroc_ci_low'], 2)}, "
                         f"{_cell(r['auroc_ci_high'], 2)}]", _cell(r["tpr_at_1pct_fpr"], 2)]
                        for r in tables["membership"] if r["category"] == c]), ""]
        attribution = [r for r in tables["attribution"] if r["category"] == c]
        if attribution:
            out += ["### Attribution: which factory sent a vector", "",
                    _table(["setting", "held-out vectors", "held-out images", "chance", "vectors per factory"],
                           [[r["setting"], _cell(r["accuracy"]), _cell(r.get("accuracy_by_image")),
                             _cell(r["chance"]), str(r["per_factory"])] for r in attribution]), ""]
        out += [f"![{p.stem}](figures/{p.name})" for p in figures if p.stem.endswith(f"_{c}")] + [""]
    out += ["Lower bounds on what leaks: a stronger attacker (a generative image prior, the global bank "
            "sent back, several rounds, auxiliary images of the victim's line) can only do better. Tables in "
            "full: inversion.csv, membership.csv, attribution.csv, releases.csv.", ""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path
