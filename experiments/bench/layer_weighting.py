"""Layer weighting (and preprocessing) on the shared real images, beside anomalib's PatchCore.

    python -m experiments.bench.layer_weighting --out DIR [--seeds 0 1 2] [--ratio 0.01]
        [--categories tire hazelnut engine_wiring] [--weightings paper concat balanced]
        [--preprocess crop] [--anomalib-python /tmp/anomalib-venv/bin/python]

Per category, the backbone's layer maps (EfficientNet-Lite0, layer2 + layer3) of every train and
test image are computed once per preprocessing; each layer weighting (patchcore/features.py)
embeds those same maps, and each seed draws its own greedy coreset (`patchcore.model.subsample`,
the paper's approximate greedy) at `--ratio`, scored by fedpatch's own scoring and metrics.

anomalib (2.7's `PatchcoreModel`, in its own virtual environment: never a fedpatch dependency)
gets the *same* layer maps: its feature extractor is replaced by one that hands them over, so its
pooling, embedding, KCenterGreedy coreset, 9-neighbour re-weighted image score and anomaly map
run on identical backbone outputs. Its scores and maps come back as .npy files and go through
fedpatch's metrics, so the numbers differ only by the method.

Preprocessing variants (--preprocess): `crop` (resize 256, center-crop 224: the paper's),
`short224` (shorter side to 224, aspect kept, no crop), `squash224` (224 x 224, aspect lost),
`short320` (shorter side to 320, no crop: more patches, finer defects). Image metrics are on the
same test images in every case; pixel metrics at each image's original resolution, so a crop
that cuts defects away pays for it (the part outside the crop gets the map's edge values).

Writes results.csv (one row per category, preprocessing, method, seed), summary.csv/summary.md
(mean and std over seeds) and manifest.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments.app.runs import Manifest, new_run_dir, write_json
from patchcore.anomaly_map import to_pixel_maps
from patchcore.backbones import FeatureExtractor
from patchcore.config import BackboneConfig, Config, CoresetConfig, DataConfig, ModelConfig
from patchcore.data import ImageDataset, image_size, union_mask
from patchcore.data.sources import load_records, model_preprocess
from patchcore.features import embed
from patchcore.memory_bank import MemoryBank
from patchcore.metrics import evaluate
from patchcore.model import patch_scores, subsample

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CATEGORIES = {  # name -> (format, root)
    "tire": ("mvtec", SHARED / "mvtec"),
    "hazelnut": ("mvtec", SHARED / "mvtec"),
    "engine_wiring": ("autovi", SHARED / "autovi"),
}
PREPROCESS = {"crop": (256, 224), "short224": (224, None), "squash224": ((224, 224), None), "short320": (320, None)}

# Run by the anomalib interpreter: PatchcoreModel on fedpatch's layer maps.
ANOMALIB = r"""
import json, sys, numpy as np, torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
folder, ratio, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(seed); np.random.seed(seed)
class Maps(torch.nn.Module):  # stands in for the timm extractor: hands over fedpatch's maps
    def forward(self, x):
        return self.current
model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False)
model.feature_extractor = Maps()
def batches(split):
    l2, l3 = np.load(f"{folder}/{split}_layer2.npy"), np.load(f"{folder}/{split}_layer3.npy")
    for i in range(0, len(l2), 16):
        yield torch.from_numpy(l2[i:i + 16]), torch.from_numpy(l3[i:i + 16])
size = json.load(open(f"{folder}/size.json"))
model.train()
for a, b in batches("train"):
    model.feature_extractor.current = {"layer2": a, "layer3": b}
    model(torch.zeros(len(a), 3, *size))
model.subsample_embedding(ratio)
model.eval()
scores, maps = [], []
with torch.no_grad():
    for a, b in batches("test"):
        model.feature_extractor.current = {"layer2": a, "layer3": b}
        out = model(torch.zeros(len(a), 3, *size))
        scores.append(out.pred_score.reshape(-1).numpy()); maps.append(out.anomaly_map[:, 0].numpy())
np.save(f"{folder}/scores_{seed}.npy", np.concatenate(scores))
np.save(f"{folder}/maps_{seed}.npy", np.concatenate(maps).astype(np.float32))
import anomalib
print(json.dumps({"bank": int(model.memory_bank.shape[0]), "dim": int(model.memory_bank.shape[1]),
                  "version": anomalib.__version__}))
"""


def layer_maps(extractor: FeatureExtractor, dataset: ImageDataset,
               desc: str) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """[layer2 (N, C2, h2, w2), layer3 (N, C3, h3, w3)] of every image, and the input size."""
    outs: list[list[torch.Tensor]] = [[], []]
    size = None
    with torch.inference_mode():
        for i in tqdm(range(0, len(dataset), 16), desc=desc, leave=False):
            images = torch.stack([dataset[j]["image"] for j in range(i, min(i + 16, len(dataset)))])
            size = tuple(images.shape[-2:])
            maps = extractor(images)
            for k, name in enumerate(("layer2", "layer3")):
                outs[k].append(maps[name])
    return [torch.cat(o) for o in outs], size  # type: ignore[return-value]


def embeddings(maps: list[torch.Tensor], weighting: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, L, D) patch embeddings of all images, batch by batch."""
    parts, grid = [], None
    for i in range(0, len(maps[0]), 32):
        emb, grid = embed([m[i:i + 32] for m in maps], 3, 1024, 1024, weighting)
        parts.append(emb)
    return torch.cat(parts), grid  # type: ignore[return-value]


class Truth:
    """Labels, and masks at each test image's original resolution (the pixel metrics' frame)."""

    def __init__(self, records, preprocess):
        self.records, self.preprocess = records, preprocess
        self.labels = np.array([r.label for r in records])
        self.sizes = [image_size(r.path) for r in records]  # (W, H)
        self.has_mask = np.array([bool(r.mask_paths) for r in records])
        self.masks = [np.asarray(union_mask(r.mask_paths, s, image=r.path)) > 0 if r.mask_paths
                      else np.zeros(s[::-1], bool) for r, s in zip(records, self.sizes)]

    def metrics(self, scores: np.ndarray, maps: np.ndarray) -> dict:
        full = [self.preprocess.invert_to_original(torch.from_numpy(m), (s[1], s[0])).numpy()
                for m, s in zip(maps, self.sizes)]
        if not self.has_mask.any():
            return evaluate(self.labels, scores)
        if len({m.shape for m in full}) > 1:
            raise SystemExit("images differ in size")
        return evaluate(self.labels, scores, masks=np.stack(self.masks), maps=np.stack(full),
                        defects=[r.defect for r in self.records], has_mask=self.has_mask)


def common_size(records, preprocess) -> tuple[int, int]:
    """The (h, w) the category's most common image size resizes to: images of another size (the
    shared hazelnut has one 512x522 among 512x512) are resized to it too, so maps stack."""
    sizes = Counter(image_size(r.path) for r in records)
    return preprocess.resized_size(*sizes.most_common(1)[0][0])


def run_anomalib(python: str, folder: Path, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    start = time.time()
    result = subprocess.run([python, "-c", ANOMALIB, str(folder), str(ratio), str(seed)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"anomalib failed:\n{result.stderr[-3000:]}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    info["seconds"] = time.time() - start
    return np.load(folder / f"scores_{seed}.npy"), np.load(folder / f"maps_{seed}.npy"), info


def summarise(rows: list[dict]) -> list[dict]:
    keys = ("image_auroc", "pixel_auroc", "aupro")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["preprocess"], r["method"]), []).append(r)
    out = []
    for (category, pre, method), rs in groups.items():
        row = {"category": category, "preprocess": pre, "method": method, "seeds": len(rs), "bank": rs[0]["bank"]}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None and r[k] == r[k]]  # None and NaN: not measured
            row[k] = statistics.mean(vals) if vals else None
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None
        out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    def cell(r, k):
        return "—" if r[k] is None else f"{r[k]:.3f} ± {r[k + '_std']:.3f}"

    lines = ["| category | preprocess | method | bank | image AUROC | pixel AUROC | AUPRO |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['category']} | {r['preprocess']} | {r['method']} | {r['bank']} | "
                     f"{cell(r, 'image_auroc')} | {cell(r, 'pixel_auroc')} | {cell(r, 'aupro')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--weightings", nargs="+", default=["paper", "concat", "balanced"])
    parser.add_argument("--preprocess", nargs="+", default=["crop"], choices=list(PREPROCESS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--anomalib-python", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = new_run_dir(REPO / "results", "bench-layer-weighting", args.out)
    base = Config(model=ModelConfig(backbone=BackboneConfig(name=args.backbone),
                                    coreset=CoresetConfig(ratio=args.ratio)))
    manifest = Manifest(out, base, "bench-layer-weighting")
    manifest.write(status="running", args=vars(args))
    extractor = FeatureExtractor(args.backbone, ("layer2", "layer3"), "imagenet")
    rows: list[dict] = []
    for category in args.categories:
        fmt, root = CATEGORIES[category]
        if not (root / category).is_dir():
            print(f"{category}: {root / category} not found, skipped")
            continue
        for pre in args.preprocess:
            resize, crop = PREPROCESS[pre]
            data = DataConfig(format=fmt, root=str(root), categories=(category,), resize=resize, crop=crop,
                              require_masks=fmt != "autovi")
            records = load_records(data, root, category)
            if crop is None and isinstance(resize, int):  # whole image: one (h, w) for the category
                data = data.model_copy(update={"resize": common_size(records, model_preprocess(data))})
            train = [r for r in records if r.split in ("train", "validation") and r.label == 0]
            test = [r for r in records if r.split == "test"]
            preprocess = model_preprocess(data)
            start = time.time()
            train_maps, size = layer_maps(extractor, ImageDataset(train, preprocess), f"{category} train")
            test_maps, _ = layer_maps(extractor, ImageDataset(test, preprocess), f"{category} test")
            truth = Truth(test, preprocess)
            print(f"{category} [{pre}]: {len(train)} train, {len(test)} test images at {size}, "
                  f"maps in {time.time() - start:.1f} s")
            for weighting in args.weightings:
                train_emb, grid = embeddings(train_maps, weighting)
                test_emb, _ = embeddings(test_maps, weighting)
                features = train_emb.flatten(0, 1)
                model = base.model.model_copy(update={"layer_weighting": weighting})
                for seed in args.seeds:
                    t0 = time.time()
                    bank = MemoryBank(subsample(features, model, seed))
                    fit_s = time.time() - t0
                    patches = torch.cat([patch_scores(bank, test_emb[i:i + 32], grid, model)
                                         for i in range(0, len(test_emb), 32)])
                    scores = patches.flatten(1).max(dim=1).values.numpy()
                    maps = to_pixel_maps(patches, size, model.smoothing_sigma).numpy()
                    m = truth.metrics(scores, maps)
                    rows.append({"category": category, "preprocess": pre, "method": f"fedpatch {weighting}",
                                 "seed": seed, "bank": len(bank), "dim": bank.dim, "coreset_s": round(fit_s, 2),
                                 "image_auroc": m["image_auroc"], "pixel_auroc": m.get("pixel_auroc"),
                                 "aupro": m.get("aupro")})
                    print(f"  {weighting:8s} seed {seed}: image {m['image_auroc']:.4f} pixel "
                          f"{m.get('pixel_auroc') or float('nan'):.4f} aupro {m.get('aupro') or float('nan'):.4f} "
                          f"(bank {len(bank)} x {bank.dim}, coreset {fit_s:.1f} s)", flush=True)
            if args.anomalib_python and pre == "crop":
                with tempfile.TemporaryDirectory(prefix="fedpatch-anomalib-") as tmp:
                    folder = Path(tmp)
                    for split, maps_ in (("train", train_maps), ("test", test_maps)):
                        for name, t in zip(("layer2", "layer3"), maps_):
                            np.save(folder / f"{split}_{name}.npy", t.numpy())
                    (folder / "size.json").write_text(json.dumps(list(size)))
                    for seed in args.seeds:
                        scores, maps, info = run_anomalib(args.anomalib_python, folder, args.ratio, seed)
                        m = truth.metrics(scores, maps)
                        rows.append({"category": category, "preprocess": pre, "method": f"anomalib {info['version']}",
                                     "seed": seed, "bank": info["bank"], "dim": info["dim"],
                                     "coreset_s": round(info["seconds"], 2), "image_auroc": m["image_auroc"],
                                     "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro")})
                        print(f"  anomalib seed {seed}: image {m['image_auroc']:.4f} pixel "
                              f"{m.get('pixel_auroc') or float('nan'):.4f} aupro {m.get('aupro') or float('nan'):.4f} "
                              f"(bank {info['bank']} x {info['dim']}, {info['seconds']:.1f} s)", flush=True)
            write_rows(out, rows)
    write_rows(out, rows)
    manifest.write(status="complete")
    print((out / "summary.md").read_text())
    print(f"-> {out}")
    return 0


def write_rows(out: Path, rows: list[dict]) -> None:
    import csv

    for name, table in (("results.csv", rows), ("summary.csv", summarise(rows))):
        if not table:
            continue
        with open(out / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    (out / "summary.md").write_text(markdown(summarise(rows)))
    write_json(out / "results.json", rows)


if __name__ == "__main__":
    raise SystemExit(main())
