"""Runs the OFFICIAL PatchCore (amazon-science/patchcore-inspection) on one category, for
experiments/bench/fidelity_official.py. Executed with the official code's own virtualenv:

    <official-venv>/bin/python experiments/bench/_official_driver.py --official DIR --data-root ROOT
        --category hazelnut --weights W.pt --out OUT [--ratios 1.0 0.1] [--keep-bn-quirk]

It must not import fedpatch: it imports only the standard library, numpy, torch, torchvision and
the official `patchcore` package from DIR/src (checked: the module must come from there). What
it does is bin/run_patchcore.py's per-category body with three changes that the bench needs:
- the backbone is torchvision's wide_resnet50_2(weights=None) with a local state dict (the
  official `backbones.load("wideresnet50")` would download ImageNet weights, and there is no
  network here); `timm`, which the official backbones.py imports but WRN50 does not use, is
  stubbed when absent;
- the official `PatchCore.load()` runs one forward of a constant image while the backbone is in
  train mode (common.py NetworkFeatureAggregator.feature_dimensions, called from
  patchcore.py load()), which moves the BatchNorm running statistics. By default this driver
  reloads the state dict after load() so both implementations start from the same backbone;
  --keep-bn-quirk leaves the moved statistics in (what the official code really scores with).
  The drift is measured either way and written to the summary;
- scores, maps and the raw masks are saved per coreset setting (npz) instead of only metrics.
Metrics are also computed exactly as bin/run_patchcore.py does (min-max normalised scores and
segmentations, patchcore.metrics on them: masks binarised by astype(int)).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import types
from pathlib import Path


def import_official(official: Path):
    src = (official / "src").resolve()
    if not (src / "patchcore" / "patchcore.py").is_file():
        sys.exit(f"_official_driver: error: {official} has no src/patchcore/patchcore.py")
    sys.path.insert(0, str(src))
    try:
        import timm  # noqa: F401
    except ImportError:  # imported by the official backbones.py; unused for WideResNet-50-2
        sys.modules["timm"] = types.ModuleType("timm")
    import patchcore
    import patchcore.common
    import patchcore.datasets.mvtec
    import patchcore.metrics
    import patchcore.patchcore
    import patchcore.sampler  # noqa: I001 (after the sys.path change and the timm stub)

    where = Path(patchcore.__file__).resolve()
    if src not in where.parents:
        sys.exit(f"_official_driver: error: imported patchcore from {where}, not from {src}")
    return patchcore


def fix_seeds(seed: int) -> None:
    """patchcore.utils.fix_seeds (utils.py imports matplotlib, which this venv need not have)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_drift(backbone, state) -> dict:
    """How far the backbone's BatchNorm buffers are from the weights file."""
    import torch

    current = backbone.state_dict()
    moved, max_mean, max_var, max_rel_var, tracked = [], 0.0, 0.0, 0.0, 0
    for key, ref in state.items():
        if not key.endswith(BN_BUFFERS):
            continue
        cur = current[key]
        if key.endswith("num_batches_tracked"):
            tracked = max(tracked, int(cur) - int(ref))
            continue
        diff = (cur.double() - ref.double()).abs().max().item()
        if diff > 0:
            moved.append(key.rsplit(".", 1)[0])
        if key.endswith("running_mean"):
            max_mean = max(max_mean, diff)
        else:
            max_var = max(max_var, diff)
            rel = (cur.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-12)
            max_rel_var = max(max_rel_var, rel.max().item())
    bn_layers = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")})
    others_equal = all(torch.equal(current[k], v) for k, v in state.items()
                       if not k.endswith(BN_BUFFERS))
    return {"bn_layers": len(bn_layers), "bn_layers_moved": len(sorted(set(moved))),
            "first_moved": sorted(set(moved))[:1], "last_moved": sorted(set(moved))[-1:],
            "max_abs_running_mean_change": max_mean, "max_abs_running_var_change": max_var,
            "max_rel_running_var_change": max_rel_var, "num_batches_tracked_increase": tracked,
            "weights_unchanged": bool(others_equal)}


def exact_scores(model, loader, bank):
    """float64 image scores (max over patches of the squared distance to the nearest bank row),
    computed from the official embeddings without faiss: what faiss's float32 search approximates."""
    import numpy as np
    import torch

    bank = torch.from_numpy(np.asarray(bank)).double()
    bank_sq = (bank * bank).sum(1)
    out = []
    for batch in loader:
        feats = torch.from_numpy(np.asarray(model._embed(batch["image"].float()))).double()
        n = len(batch["image"])
        mins = []
        for i in range(0, len(feats), 2048):
            x = feats[i:i + 2048]
            mins.append(((x * x).sum(1, keepdim=True) + bank_sq[None] - 2 * x @ bank.T).min(1).values)
        out.append(torch.cat(mins).reshape(n, -1).max(1).values.numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ratios", type=float, nargs="*", default=[1.0, 0.1])
    parser.add_argument("--keep-bn-quirk", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true",
                        help="also float64 image scores from the official features (1-NN over the whole bank)")
    parser.add_argument("--first-batch", action="store_true",
                        help="save the first test batch's input tensors and patch embeddings")
    args = parser.parse_args(argv)

    official = import_official(args.official)
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    mvtec = official.datasets.mvtec
    common = official.common
    sampler_mod = official.sampler

    def loader(split):
        dataset = mvtec.MVTecDataset(args.data_root, classname=args.category, resize=256, imagesize=224,
                                     split=split, seed=args.seed)
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0)

    train_loader, test_loader = loader(mvtec.DatasetSplit.TRAIN), loader(mvtec.DatasetSplit.TEST)
    fix_seeds(args.seed)  # run_patchcore.py: once per dataset, before the model is built

    # bin/run_patchcore.py get_patchcore, with local weights instead of backbones.load()
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    backbone = torchvision.models.wide_resnet50_2(weights=None)
    backbone.load_state_dict(state)
    backbone.name, backbone.seed = "wideresnet50", None
    model = official.patchcore.PatchCore(device)
    model.load(backbone=backbone, layers_to_extract_from=["layer2", "layer3"], device=device,
               input_shape=(3, 224, 224), pretrain_embed_dimension=1024, target_embed_dimension=1024,
               patchsize=3, featuresampler=sampler_mod.IdentitySampler(), anomaly_score_num_nn=1,
               nn_method=common.FaissNN(False, args.threads))
    drift = bn_drift(model.backbone, state)
    if not args.keep_bn_quirk:
        model.backbone.load_state_dict(state)  # undo the train-mode forward of load()
    after = bn_drift(model.backbone, state)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"category": args.category, "keep_bn_quirk": args.keep_bn_quirk,
               "bn_drift_after_load": drift, "bn_drift_when_scoring": after,
               "official_module": str(Path(official.__file__).resolve().parent),
               "torch": torch.__version__, "settings": {}}
    paths = [row[2] for row in test_loader.dataset.data_to_iterate]
    if args.first_batch:  # the official preprocessing and embedding of the first test images
        batch = next(iter(test_loader))
        feats = np.asarray(model._embed(batch["image"].float()))
        np.savez(args.out / f"{args.category}_first_batch.npz", images=batch["image"].numpy(),
                 embeddings=feats.reshape(len(batch["image"]), -1, feats.shape[-1]),
                 paths=np.asarray(paths[: len(batch["image"])]))
    for ratio in args.ratios:
        name = "off" if ratio >= 1.0 else f"{ratio:g}"
        fix_seeds(args.seed)  # the sampler's projection and starting points draw from these
        model.featuresampler = (sampler_mod.IdentitySampler() if ratio >= 1.0
                                else sampler_mod.ApproximateGreedyCoresetSampler(ratio, device))
        start = time.perf_counter()
        model.fit(train_loader)
        fit_s = time.perf_counter() - start
        bank_size = int(model.anomaly_scorer.detection_features.shape[0])
        scores, segmentations, labels, masks = model.predict(test_loader)
        total_s = time.perf_counter() - start
        scores = np.asarray(scores, dtype=np.float64)
        maps = np.stack(segmentations).astype(np.float32)
        masks = np.asarray(masks, dtype=np.float32)[:, 0]
        labels = np.asarray(labels, dtype=np.int64)
        extra = {}
        if args.exact:
            extra["exact_scores"] = exact_scores(model, test_loader, model.anomaly_scorer.detection_features)
        np.savez(args.out / f"{args.category}_{name}.npz", scores=scores, maps=maps, masks=masks,
                 labels=labels, paths=np.asarray(paths), **extra)
        # bin/run_patchcore.py's evaluation (one model: the "ensemble" mean is the model itself)
        norm_scores = (scores - scores.min()) / (scores.max() - scores.min())
        norm_maps = (maps - maps.min()) / (maps.max() - maps.min())
        image = official.metrics.compute_imagewise_retrieval_metrics(norm_scores, labels)["auroc"]
        full = official.metrics.compute_pixelwise_retrieval_metrics(norm_maps, masks)["auroc"]
        sel = [i for i in range(len(masks)) if np.sum(masks[i]) > 0]
        anomaly = official.metrics.compute_pixelwise_retrieval_metrics(norm_maps[sel], masks[sel])["auroc"]
        summary["settings"][name] = {"ratio": ratio, "bank_size": bank_size, "fit_s": fit_s, "total_s": total_s,
                                     "instance_auroc": float(image), "full_pixel_auroc": float(full),
                                     "anomaly_pixel_auroc": float(anomaly)}
        print(f"official {args.category} coreset {name} quirk={'kept' if args.keep_bn_quirk else 'fixed'}: "
              f"bank {bank_size}, image AUROC {image:.4f}, full pixel AUROC {full:.4f}, {total_s:.0f} s", flush=True)
        save_summary(args.out / f"{args.category}_summary.json", summary)
    save_summary(args.out / f"{args.category}_summary.json", summary)
    return 0


def save_summary(path: Path, summary: dict) -> None:
    """Write the summary after every setting, keeping settings an earlier run saved there."""
    if path.is_file():
        earlier = json.loads(path.read_text())
        summary = {**summary, "settings": {**earlier.get("settings", {}), **summary["settings"]}}
    path.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
