"""The Flower ClientApp: one factory, as a thin adapter around `federated.site.Site`.

`train` answers with the factory's local coresets: an ArrayRecord "features" of (n, D) arrays
keyed by category, a ConfigRecord "payload" with each payload's scalars keyed
"<category>.<field>", a ConfigRecord "site" (who answered) and a MetricRecord "timings".
`evaluate` receives the global banks (ArrayRecord "banks", keyed by category) and answers with
a MetricRecord "metrics" of numbers keyed "<category>.<metric>". `query` answers "who are you"
(ConfigRecord "site": factory id), so the server can name a factory that later fails or stays
silent, and skip factories whose payloads it already holds (a resumed run). Int8 payloads carry
their per-vector scales as a second array "<category>#scales". Images never leave the site.

The app learns the experiment from the run config ("config", "overrides", "run-dir"): `flwr run`
fills it from pyproject.toml, and `build_client_app(defaults)` bakes defaults in for
`run_simulation`, which cannot pass a run config. Which factory a node is comes from its node
config ("partition-id", as simulations and `flower-supernode --node-config` set it), or else
from the server's assignment in the train message. The Site (and its loaded backbone) is cached
per process, so train and evaluate on one worker load the backbone once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.config import ExperimentConfig
from federated.errors import PayloadError
from federated.payload import Payload
from federated.plan import experiment_config, plan_factories
from federated.site import Site
from patchcore.config import to_dict
from patchcore.errors import ConfigError

FEATURES, PAYLOAD, SITE, TIMINGS = "features", "payload", "site", "timings"
BANKS, METRICS, ASSIGNMENT, RELEASE = "banks", "metrics", "assignment", "release"
SCALES_SUFFIX = "#scales"

_CACHE: dict[str, Any] = {"key": None, "plan": None, "model": None, "sites": {}}
# Sites kept per process (least recently used dropped first). Ray reuses a few actors for all
# simulated factories: with 100 factories an unbounded dict would keep 100 shards' state per
# actor. A Site is cheap to rebuild: the backbone is shared and stays loaded.
MAX_SITES = 8


def pack_payloads(payloads: Mapping[str, Payload]) -> tuple[ArrayRecord, ConfigRecord]:
    """{category: payload} -> (features by category, scalars keyed "<category>.<field>")."""
    arrays, scalars = {}, {}
    for category, payload in payloads.items():
        parts, fields = payload.to_parts()
        arrays[category] = Array(parts["features"])  # (n, D) float32/float16/int8
        if "scales" in parts:
            arrays[category + SCALES_SUFFIX] = Array(parts["scales"])  # (n,) float32
        scalars.update({f"{category}.{k}": v for k, v in fields.items()})
    return ArrayRecord(arrays), ConfigRecord(scalars)


def unpack_payloads(arrays: ArrayRecord,
                    scalars: ConfigRecord) -> tuple[dict[str, Payload], dict[str, str]]:
    """Inverse of `pack_payloads`: ({category: payload}, {category: why it is unreadable})."""
    fields: dict[str, dict[str, Any]] = {category: {} for category in arrays
                                         if not category.endswith(SCALES_SUFFIX)}
    for key, value in scalars.items():
        category, _, field = key.rpartition(".")  # field names hold no dot; categories may
        fields.setdefault(category, {})[field] = value
    payloads, problems = {}, {}
    for category, config in fields.items():
        try:
            features = {"features": arrays[category].numpy()} if category in arrays else {}
            if category + SCALES_SUFFIX in arrays:
                features["scales"] = arrays[category + SCALES_SUFFIX].numpy()
            payloads[category] = Payload.from_parts(features, config)
        except (PayloadError, TypeError, ValueError) as exc:
            problems[category] = str(exc)
    return payloads, problems


def _run_settings(context: Context, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The run config: baked-in defaults, overridden by what Flower passes."""
    return {**defaults, **dict(context.run_config)}


def factory_identity(context: Context, message: Message, config: ExperimentConfig) -> int:
    """This node's factory id: node config "partition-id", else the server's assignment."""
    num = config.federation.num_factories
    node = context.node_config
    if "partition-id" in node:
        factory_id = int(node["partition-id"])
        partitions = int(node.get("num-partitions", num))
        if partitions != num:
            raise ConfigError(f"this node is partition {factory_id} of {partitions} but "
                              f"federation.num_factories is {num}: start {num} supernodes")
    elif message.has_content() and ASSIGNMENT in message.content:
        factory_id = int(message.content[ASSIGNMENT]["factory-id"])
    else:
        raise ConfigError("node config has no 'partition-id' and the server assigned no "
                          "factory: start the supernode with --node-config 'partition-id=K'")
    if not 0 <= factory_id < num:
        raise ConfigError(f"factory id {factory_id} is out of range for "
                          f"federation.num_factories = {num}")
    return factory_id


def site_for(config: ExperimentConfig, factory_id: int) -> Site:
    """The cached Site of (config, factory); one backbone per process, shared by its Sites
    (a Ray worker may serve several simulated factories, one message at a time)."""
    key = json.dumps(to_dict(config), sort_keys=True)
    if _CACHE["key"] != key:
        _CACHE.update(key=key, plan=plan_factories(config), model=None, sites={})
        torch.set_num_threads(max(1, int(config.federation.client_cpus)))
    sites: dict[int, Site] = _CACHE["sites"]
    if factory_id not in sites:
        plan = _CACHE["plan"]
        while len(sites) >= MAX_SITES:
            sites.pop(next(iter(sites)))  # the least recently used
        sites[factory_id] = Site(config, plan.shard(factory_id), plan.shifts, model=_CACHE["model"],
                                  root=plan.root)
        _CACHE["model"] = sites[factory_id].model
    sites[factory_id] = sites.pop(factory_id)  # most recently used last
    return sites[factory_id]


def handle_query(message: Message, context: Context, defaults: Mapping[str, Any]) -> Message:
    """Who this node is (its factory id); loads no backbone and reads no image."""
    config, _ = experiment_config(_run_settings(context, defaults))
    factory_id = factory_identity(context, message, config)
    return Message(RecordDict({SITE: ConfigRecord({"factory-id": factory_id})}), reply_to=message)


def handle_train(message: Message, context: Context, defaults: Mapping[str, Any]) -> Message:
    """Local coresets of this factory's training images, per category; an empty shard answers
    with status "empty" and nothing to send."""
    start = time.perf_counter()
    config, _ = experiment_config(_run_settings(context, defaults))
    factory_id = factory_identity(context, message, config)
    site = site_for(config, factory_id)
    setup_s = time.perf_counter() - start
    payloads, seconds = site.local_payloads(progress=False)
    arrays, scalars = pack_payloads(payloads)
    timings = {"setup_s": setup_s, "backbone_load_s": site.load_s, **seconds,
               "total_s": time.perf_counter() - start}
    release = {f"{c}.{k}": float(v) for c, stats in site.release_stats.items() for k, v in stats.items()}
    status = "ok" if payloads else "empty"
    content = RecordDict({
        FEATURES: arrays, PAYLOAD: scalars,
        SITE: ConfigRecord({"factory-id": factory_id, "categories": sorted(payloads),
                            "status": status, "train-images": len(site.shard.train)}),
        TIMINGS: MetricRecord({k: float(v) for k, v in timings.items()}),
        RELEASE: MetricRecord(release),
    })
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, defaults: Mapping[str, Any]) -> Message:
    """Metrics of the global banks on this factory's own test images."""
    start = time.perf_counter()
    config, _ = experiment_config(_run_settings(context, defaults))
    site = site_for(config, factory_identity(context, message, config))
    banks = {c: np.asarray(a.numpy()) for c, a in message.content[BANKS].items()}  # (M, D) each
    metrics = site.evaluate(banks)
    flat = {f"{c}.{k}": float(v) for c, m in metrics.items() for k, v in m.items()}
    content = RecordDict({
        METRICS: MetricRecord(flat),
        SITE: ConfigRecord({"factory-id": site.factory_id}),
        TIMINGS: MetricRecord({"evaluate_s": time.perf_counter() - start}),
    })
    return Message(content, reply_to=message)


def build_client_app(defaults: Mapping[str, Any] | None = None,
                     mods: list | None = None) -> ClientApp:
    """A ClientApp whose run config falls back to `defaults` (for `run_simulation`); `mods`
    are Flower mods around every handler (tests use one to record outgoing messages)."""
    baked = dict(defaults or {})
    client = ClientApp(mods=mods)

    @client.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context, baked)

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, baked)

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, baked)

    return client


app = build_client_app()
