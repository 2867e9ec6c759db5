"""Per-stage PatchCore numbers on the real shared images, measured in one run.

    python experiments/bench/patchcore.py [--root ../shared/data/mvtec] [--category tire]
        [--backbone efficientnet_lite0] [--weights imagenet] [--repeats 5] [--precision float32]
        [--device auto] [--nn-precision auto] [--pruning auto]

Prints, for one category: backbone forward alone (img/s), feature extraction (forward + patch
embedding, img/s), coreset selection (s), scoring (img/s) and, inside scoring, the 1-NN search
alone; each stage also as a ratio to the backbone forward over the same images (extraction to
the train forward, coreset to the whole forward, scoring and search to the test forward), and the
ratio of end-to-end fit+predict time per image to the backbone forward time per image. Images
are decoded and preprocessed once up front (decoding is reported separately) so the stages
compare compute with compute. Each repeat times every stage back to back (forward first) and
gives its own ratio; the reported ratio is the median of those, the stages are medians too. On
CUDA every timing waits for the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from patchcore.config import BackboneConfig, DataConfig, ModelConfig  # noqa: E402
from patchcore.coreset import coreset_size, greedy_coreset  # noqa: E402
from patchcore.data import ImageDataset, make_loader  # noqa: E402
from patchcore.data.sources import load_records, model_preprocess  # noqa: E402
from patchcore.model import PatchCore  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    """(seconds, result) of one call, waiting for the device before and after."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "mvtec"))
    p.add_argument("--category", default="tire")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--nn-precision", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--pruning", default="auto", choices=["auto", "on", "off"], help="coreset pruning")
    args = p.parse_args()

    data = DataConfig(format="mvtec", root=args.root, batch_size=args.batch_size)
    records = load_records(data, Path(args.root), args.category)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    pre = model_preprocess(data)
    decode_s, batches = timed(lambda: {name: [b["image"] for b in make_loader(ImageDataset(rs, pre), args.batch_size)]
                                       for name, rs in (("train", train), ("test", test))})
    config = ModelConfig(backbone=BackboneConfig(args.backbone, ("layer2", "layer3"), args.weights),
                         precision=args.precision, nn_precision=args.nn_precision)
    model = PatchCore(config, args.device)
    n_train, n_test = len(train), len(test)

    def forward(name: str) -> None:
        with torch.inference_mode():
            for b in batches[name]:
                model.extractor(b.to(model.device))

    forward("test")  # warm-up
    queries = model.extract(batches["test"], progress=False)  # warm-up too; the search's queries
    rows = []  # one row per repeat: every stage timed back to back, so a busy spell hits all alike
    for _ in range(args.repeats):
        row = {}
        row["fwd_train"], _ = timed(lambda: forward("train"))
        row["fwd_test"], _ = timed(lambda: forward("test"))
        row["extract"], features = timed(lambda: model.extract(batches["train"], progress=False))
        size = coreset_size(len(features), model.config.coreset.ratio)
        row["coreset"], idx = timed(lambda: greedy_coreset(features, size, seed=0, pruning=args.pruning))
        model.set_bank(features[idx])
        row["score"], _ = timed(lambda: model.predict(batches["test"], progress=False))
        row["search"], _ = timed(lambda: model.bank.nearest(queries))
        row["ratio"] = (row["extract"] + row["coreset"] + row["score"]) / (row["fwd_train"] + row["fwd_test"])
        rows.append(row)
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    fwd_train_s, fwd_test_s, extract_s, coreset_s, score_s, search_s = (
        med[k] for k in ("fwd_train", "fwd_test", "extract", "coreset", "score", "search"))

    fwd_per_img = (fwd_train_s + fwd_test_s) / (n_train + n_test)
    e2e_per_img = (extract_s + coreset_s + score_s) / (n_train + n_test)
    print(f"device {model.device}, torch threads {torch.get_num_threads()}, backbone {args.backbone} "
          f"({args.weights}, {args.precision}), "
          f"1-NN {'bf16 + exact re-rank' if model.bank.uses_bf16() else 'float32'}, "
          f"coreset pruning {args.pruning}")
    print(f"category {args.category}: {n_train} train, {n_test} test images; {len(features)} patches -> bank {size}")
    print(f"decode + preprocess      {decode_s:8.2f} s   ({(n_train + n_test) / decode_s:6.1f} img/s)")
    print(f"backbone forward alone   {fwd_train_s + fwd_test_s:8.2f} s   "
          f"({(n_train + n_test) / (fwd_train_s + fwd_test_s):6.1f} img/s)")
    fwd_all = fwd_train_s + fwd_test_s
    print(f"extraction (train)       {extract_s:8.2f} s   ({n_train / extract_s:6.1f} img/s)   "
          f"{extract_s / fwd_train_s:5.2f}x the train forward")
    print(f"coreset selection        {coreset_s:8.2f} s   ({len(features)} -> {size})   "
          f"{coreset_s / fwd_all:5.2f}x the forward")
    print(f"scoring (test)           {score_s:8.2f} s   ({n_test / score_s:6.1f} img/s)   "
          f"{score_s / fwd_test_s:5.2f}x the test forward")
    print(f"  of which 1-NN search   {search_s:8.2f} s   ({len(queries)} queries x {size})   "
          f"{search_s / fwd_test_s:5.2f}x the test forward")
    per_repeat = " ".join(f"{r['ratio']:.2f}" for r in rows)
    print(f"end-to-end fit+predict per image / backbone forward per image: {med['ratio']:.2f}x "
          f"({e2e_per_img * 1e3:.1f} ms vs {fwd_per_img * 1e3:.1f} ms; median of {args.repeats} repeats, "
          f"each ratio from back-to-back timings: {per_repeat})")
    total = extract_s + coreset_s + score_s
    print(f"share of fit+predict: extraction {extract_s / total:.0%}, coreset {coreset_s / total:.0%}, "
          f"scoring {score_s / total:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
