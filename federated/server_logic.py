"""The server's work, free of Flower: check every payload, aggregate per category, write it down.

A factory can be misconfigured (another backbone, another feature size), buggy (NaN features)
or simply wrong about who it is; one such payload must not corrupt or stop the whole federation.
`aggregate_all` therefore validates each payload on its own, drops the bad ones with a one-line
reason that is logged and kept in `rejected`, and aggregates what is left. `save_global_banks`
writes one bank per category with the provenance a reader needs (who contributed how much), and
`write_federation_json` records what each factory uploaded against its raw features.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from federated.aggregation import AggregationResult, aggregate
from federated.config import ExperimentConfig
from federated.errors import PayloadError
from federated.partition import factory_name
from federated.payload import Payload, raw_feature_bytes, validate
from patchcore.coreset import coreset_size
from patchcore.memory_bank import MemoryBank, atomic_write_bytes
from patchcore.model import resolve_device

log = logging.getLogger("fedpatch.server")


def _check(payload: Payload, factory_id: int, config: ExperimentConfig, expected_dim: int,
           backbone_id: str) -> None:
    """Raise PayloadError when `payload` must not enter the bank (see federated.payload.validate),
    also when it claims to come from another factory or exceeds the local coreset size."""
    if payload.factory_id != factory_id:
        raise PayloadError(f"payload claims factory-{payload.factory_id} but was sent by "
                           f"{factory_name(factory_id)}")
    max_vectors = coreset_size(max(payload.num_patches, 0), config.federation.local_ratio)
    validate(payload, expected_dim=expected_dim, expected_backbone=backbone_id,
             max_vectors=max_vectors)


def aggregate_all(payloads: Mapping[int, Mapping[str, Payload]], config: ExperimentConfig,
                  model_config_dict: Mapping[str, Any], backbone_id: str,
                  rejected: list[dict[str, Any]] | None = None) -> dict[str, AggregationResult]:
    """{category: global bank} from {factory id: {category: payload}}.

    Every payload is validated first; an invalid one is dropped, logged, and appended to
    `rejected` (when given) as {"factory", "category", "reason"}. A category left without any
    valid payload gets no bank (and is logged), rather than failing the other categories.
    """
    rejected = rejected if rejected is not None else []
    expected_dim = int(model_config_dict["target_embed_dim"])
    valid: dict[str, list[Payload]] = {}
    for factory_id in sorted(payloads):
        for category, payload in sorted(payloads[factory_id].items()):
            try:
                _check(payload, factory_id, config, expected_dim, backbone_id)
            except PayloadError as exc:
                log.warning("rejected %s/%s: %s", factory_name(factory_id), category, exc)
                rejected.append({"factory": factory_name(factory_id), "category": category,
                                 "reason": str(exc)})
                continue
            valid.setdefault(category, []).append(payload)
    f, c = config.federation, config.model.coreset
    device = resolve_device(config.device)
    results: dict[str, AggregationResult] = {}
    for category, accepted in sorted(valid.items()):
        results[category] = aggregate(
            accepted, method=f.aggregation, global_ratio=f.global_ratio, seed=config.seed,
            coreset_method=c.method, projection_dim=c.projection_dim, num_starts=c.num_starts,
            device=device)
    for category in sorted({c for p in payloads.values() for c in p} - set(results)):
        log.warning("category %s has no valid payload: no global bank", category)
    return results


def aggregation_summary(result: AggregationResult) -> dict[str, Any]:
    """JSON-ready bookkeeping of one category's aggregation (also stored in the bank file)."""
    return {
        "aggregation": result.method,
        "budget": int(result.budget),
        "bank_size": int(result.bank.shape[0]),
        "union_size": result.union_size,
        "factory_ids": list(result.factory_ids),
        "shares": list(result.shares),
        "vectors_received": list(result.union_sizes),
        "kept_per_factory": {factory_name(k): v for k, v in result.kept_per_factory().items()},
    }


def save_global_banks(results: Mapping[str, AggregationResult], run_dir: str | Path,
                      metadata: Mapping[str, Any]) -> dict[str, Path]:
    """Write `run_dir/federated/banks/<category>.safetensors` (+ .json) for every category.

    `metadata` is what every bank shares (model config under "model", "seed", "backbone_id",
    preprocessing, ...); each bank adds its category and its aggregation summary, so
    `PatchCore.from_bank` can rebuild the model and a reader can see who contributed what.
    """
    folder = Path(run_dir) / "federated" / "banks"
    written: dict[str, Path] = {}
    for category, result in sorted(results.items()):
        meta = {**metadata, "category": category, **aggregation_summary(result)}
        tensor_path, _ = MemoryBank(result.bank, meta).save(folder / category)
        written[category] = tensor_path
    return written


def upload_stats(payloads: Mapping[str, Payload],
                 seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """One factory's upload: bytes sent vs the raw fp32 patch features it holds, per category
    and in total, plus the per-phase seconds the factory reported."""
    per_category = {}
    for category, p in sorted(payloads.items()):
        raw = raw_feature_bytes(p.num_patches, p.feature_dim)
        per_category[category] = {
            "bytes_sent": p.nbytes, "raw_feature_bytes": raw, "vectors_sent": p.num_vectors,
            "num_patches": p.num_patches, "num_images": p.num_images,
            "upload_ratio": p.nbytes / raw if raw else None, "dtype": str(p.features.dtype)}
    sent = sum(s["bytes_sent"] for s in per_category.values())
    raw = sum(s["raw_feature_bytes"] for s in per_category.values())
    return {
        "bytes_sent": sent, "raw_feature_bytes": raw,
        "upload_ratio": sent / raw if raw else None,
        "vectors_sent": sum(s["vectors_sent"] for s in per_category.values()),
        "num_patches": sum(s["num_patches"] for s in per_category.values()),
        "num_images": sum(s["num_images"] for s in per_category.values()),
        "categories": per_category,
        "seconds": {k: float(v) for k, v in (seconds or {}).items()},
    }


def write_federation_json(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """`run_dir/federated/federation.json`, written atomically (a reader never sees half)."""
    path = Path(run_dir) / "federated" / "federation.json"
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, text.encode())
    return path
