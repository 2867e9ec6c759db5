"""The server's work, free of Flower: check every payload, aggregate per category, write it down.

A factory can be misconfigured (another backbone, another feature size), buggy (NaN features)
or simply wrong about who it is; one such payload must not corrupt or stop the whole federation.
`aggregate_all` therefore validates each payload on its own, drops the bad ones with a one-line
reason that is logged and kept in `rejected`, refuses to build anything when fewer than
`federation.min_clients` factories are left (QuorumError), screens each category for poisoned
factories (federated/robust.py; flagged, excluded or filtered per `federation.poison_mode`) and
aggregates what is left. `save_global_banks`
writes one bank per category with the provenance a reader needs (who contributed how much), and
`write_federation_json` records what each factory uploaded against its raw features.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from federated.aggregation import AggregationResult, aggregate
from federated.config import ExperimentConfig
from federated.errors import PayloadError, QuorumError
from federated.partition import factory_name
from federated.payload import Payload, load_payload, payload_fingerprint, raw_feature_bytes, save_payload, validate
from federated.robust import detect_poisoned, mitigate
from patchcore import strict_json
from patchcore.config import ModelConfig, build, to_dict
from patchcore.coreset import coreset_size
from patchcore.errors import ConfigError
from patchcore.memory_bank import MemoryBank, atomic_write_bytes
from patchcore.model import embedding_dim, resolve_device

log = logging.getLogger("fedpatch.server")


def _namer(names: Mapping[int, str] | None):
    """factory id -> the name reports use (factory-K when `names` does not know it)."""
    return lambda k: (names or {}).get(k) or factory_name(k)


def _check(payload: Payload, factory_id: int, config: ExperimentConfig, expected_dim: int,
           backbone_id: str, name=factory_name) -> None:
    """Raise PayloadError when `payload` must not enter the bank (see federated.payload.validate),
    also when it claims to come from another factory or exceeds the local coreset size."""
    if payload.factory_id != factory_id:
        raise PayloadError(f"payload claims {name(payload.factory_id)} but was sent by "
                           f"{name(factory_id)}")
    f = config.federation
    max_vectors = coreset_size(max(payload.num_patches, 0), f.local)
    if f.max_vectors is not None:
        max_vectors = min(max_vectors, f.max_vectors)
    validate(payload, expected_dim=expected_dim, expected_backbone=backbone_id,
             max_vectors=max_vectors, max_bytes=f.max_bytes)


def aggregate_all(payloads: Mapping[int, Mapping[str, Payload]], config: ExperimentConfig,
                  model_config_dict: Mapping[str, Any], backbone_id: str,
                  rejected: list[dict[str, Any]] | None = None,
                  poisoning: dict[str, Any] | None = None,
                  names: Mapping[int, str] | None = None) -> dict[str, AggregationResult]:
    """{category: global bank} from {factory id: {category: payload}}.

    Every payload is validated first; an invalid one is dropped, logged, and appended to
    `rejected` (when given) as {"factory", "category", "reason"}. Fewer than
    federation.min_clients factories with a valid payload: QuorumError, nothing built. Each
    category is then screened for poisoners (`poisoning[category]` gets the detector's report
    and what was dropped). A category left without any valid payload gets no bank (and is
    logged), rather than failing the other categories. `names` ({factory id: name}, default
    factory-K) is how reports name the factories.
    """
    name = _namer(names)
    rejected = rejected if rejected is not None else []
    poisoning = poisoning if poisoning is not None else {}
    transform = model_config_dict.get("transform") or {}
    expected_dim = int(transform.get("projection_dim") or embedding_dim(build(ModelConfig, model_config_dict, "model")))
    valid: dict[str, list[Payload]] = {}
    for factory_id in sorted(payloads):
        for category, payload in sorted(payloads[factory_id].items()):
            try:
                _check(payload, factory_id, config, expected_dim, backbone_id, name)
            except PayloadError as exc:
                log.warning("rejected %s/%s: %s", name(factory_id), category, exc)
                rejected.append({"factory": name(factory_id), "category": category,
                                 "reason": str(exc)})
                continue
            valid.setdefault(category, []).append(payload)
    f, c = config.federation, config.model.coreset
    contributors = {p.factory_id for accepted in valid.values() for p in accepted}
    if len(contributors) < f.min_clients:
        raise QuorumError(f"only {len(contributors)} of {max(f.num_factories, len(payloads))} factories sent valid "
                          f"payloads (federation.min_clients = {f.min_clients}): no global bank "
                          f"written")
    for category in sorted(valid):
        valid[category], poisoning[category] = screen_poisoned(valid[category], config, name)
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


def screen_poisoned(accepted: list[Payload], config: ExperimentConfig,
                    name=factory_name) -> tuple[list[Payload], dict[str, Any]]:
    """One category's payloads after the poisoned-factory screen, and what the screen saw.

    Distances are compared within the category (non-IID splits would make honest factories of
    different products look far apart). "exclude" drops a flagged factory's payload, "filter"
    keeps only its vectors that lie as close to the other factories as honest ones do.
    """
    f = config.federation
    if f.poison_mode == "off":
        return accepted, {"mode": "off"}
    features = {p.factory_id: torch.from_numpy(p.decoded()) for p in accepted}  # (n_k, D) each
    report, distances = detect_poisoned(features, quantile=f.poison_quantile,
                                        threshold=f.poison_threshold)
    kept, dropped = mitigate(features, report, distances, f.poison_mode)
    for k in report.flagged:
        log.warning("poisoning screen (%s): %s", f.poison_mode, report.reasons[k])
    out = []
    for p in accepted:
        if p.factory_id not in kept:
            continue
        if dropped[p.factory_id]:
            p = dataclasses.replace(p, features=kept[p.factory_id].numpy(), scales=None)
        out.append(p)
    summary = {"mode": f.poison_mode, **report.to_dict(),
               "names": {str(p.factory_id): name(p.factory_id) for p in accepted},
               "dropped_vectors": {name(k): v for k, v in dropped.items()},
               "excluded": [name(k) for k in report.flagged if k not in kept]}
    return out, summary


def payload_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The settings a factory's payload depends on (what `resume` must find unchanged)."""
    d = to_dict(config)
    f = d["federation"]
    keep = ("num_factories", "partition", "alpha", "quantity_exponent", "domain_shift",
            "shift_strength", "shift_families", "shifted_factories", "local_ratio", "payload_dtype", "privacy")
    return {"seed": d["seed"], "data": d["data"], "model": d["model"],
            "federation": {**{k: f[k] for k in keep}, "local_ratio": config.federation.local}}


def save_received(payloads: Mapping[str, Mapping[str, Payload]], run_dir: str | Path,
                  config: ExperimentConfig) -> Path:
    """Keep every payload the server received under run_dir/federated/payloads/<factory>/, so a
    later run can resume without asking those factories again; returns the folder."""
    folder = Path(run_dir) / "federated" / "payloads"
    fingerprint = payload_fingerprint(payload_settings(config))
    for factory, by_category in sorted(payloads.items()):
        for category, payload in sorted(by_category.items()):
            save_payload(payload, folder / factory / category,
                         {"fingerprint": fingerprint, "category": category, "factory": factory})
    return folder


def load_received(run_dir: str | Path, config: ExperimentConfig) -> dict[str, dict[str, Payload]]:
    """The payloads an earlier run saved ({factory name: {category: payload}}), for resuming.

    ConfigError when the folder has none, or when they were produced under other settings
    (naming the first setting that differs); PayloadError naming a file that cannot be read.
    """
    folder = Path(run_dir) / "federated" / "payloads"
    files = sorted(folder.glob("*/*.safetensors"))
    if not files:
        raise ConfigError(f"nothing to resume from: no saved payloads in {folder}")
    expected = payload_fingerprint(payload_settings(config))
    out: dict[str, dict[str, Payload]] = {}
    for path in files:
        payload, meta = load_payload(path.with_suffix(""))
        if meta.get("fingerprint") != expected:
            raise ConfigError(f"cannot resume from {path}: it was produced with other settings "
                              f"({_first_difference(Path(run_dir), config)}); rerun those factories")
        if meta.get("factory", path.parent.name) != path.parent.name:
            raise PayloadError(f"saved payload {path} claims factory {meta.get('factory')}")
        out.setdefault(path.parent.name, {})[meta.get("category", path.stem)] = payload
    return out


def _first_difference(run_dir: Path, config: ExperimentConfig) -> str:
    """"federation.local_ratio: 0.1 then, 0.2 now" from the earlier run's config.yaml, if any."""
    path = run_dir / "federated" / "config.yaml"
    try:
        before = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return f"{path} is unreadable"
    now = payload_settings(config)

    def walk(a: Any, b: Any, key: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(b):
                found = walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
                if found:
                    return found
            return None
        return None if a == b else f"{key}: {a!r} then, {b!r} now"

    return walk({k: before.get(k) for k in now}, now, "") or "the settings differ"


def aggregation_summary(result: AggregationResult,
                        names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """JSON-ready bookkeeping of one category's aggregation (also stored in the bank file)."""
    name = _namer(names)
    return {
        "aggregation": result.method,
        "budget": int(result.budget),
        "bank_size": int(result.bank.shape[0]),
        "union_size": result.union_size,
        "factory_ids": list(result.factory_ids),
        "shares": list(result.shares),
        "vectors_received": list(result.union_sizes),
        "factories": [name(k) for k in result.factory_ids],
        "kept_per_factory": {name(k): v for k, v in result.kept_per_factory().items()},
    }


def save_global_banks(results: Mapping[str, AggregationResult], run_dir: str | Path,
                      metadata: Mapping[str, Any],
                      names: Mapping[int, str] | None = None) -> dict[str, Path]:
    """Write `run_dir/federated/banks/<category>.safetensors` (+ .json) for every category.

    `metadata` is what every bank shares (model config under "model", "seed", "backbone_id",
    preprocessing, ...); each bank adds its category and its aggregation summary, so
    `PatchCore.from_bank` can rebuild the model and a reader can see who contributed what.
    """
    folder = Path(run_dir) / "federated" / "banks"
    written: dict[str, Path] = {}
    for category, result in sorted(results.items()):
        meta = {**metadata, "category": category, **aggregation_summary(result, names)}
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


def write_run_config(run_dir: str | Path, config: ExperimentConfig) -> Path:
    """`run_dir/federated/config.yaml`: the settings the server ran with (what resume compares)."""
    path = Path(run_dir) / "federated" / "config.yaml"
    atomic_write_bytes(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    return path


def write_federation_json(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """`run_dir/federated/federation.json`, written atomically (a reader never sees half)."""
    path = Path(run_dir) / "federated" / "federation.json"
    text = strict_json.dumps(report)  # NaN/inf -> null: strict JSON
    atomic_write_bytes(path, text.encode())
    return path
