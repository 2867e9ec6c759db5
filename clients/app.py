"""The Flower ClientApp: one factory, a thin adapter around `federated.site.Site.answer`.

Which factory a node is comes from its node config (`flower-supernode --node-config "k=v ..."`):

- a deployed site names its own folder: `data-path` (required: the site's images, the whole
  folder, in the mvtec, mvtec3d or autovi layout), `factory` (its name; default: the folder's
  name), `data-format` (default: detected from the folder), `categories` (comma-separated;
  default: those of data.categories it holds, or all), `device` (default: the config's);
- a simulated site is shard `partition-id` of `num-partitions` of the config's data root, as
  Flower's simulation sets them (federated/plan.py).

The experiment comes from the run config (config, overrides, flat keys; federated/plan.py). The
Site, and its backbone, is cached per process: a Ray worker serving several simulated factories
loads one backbone; a deployed SuperNode starts a fresh ClientApp process per message, so its
backbone loads once per round that needs it (train, evaluate; identify loads none).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federated.config import ExperimentConfig
from federated.plan import experiment_config, plan_factories
from federated.protocol import from_flower, to_flower
from federated.site import Site
from patchcore.config import to_dict
from patchcore.errors import ConfigError

_CACHE: dict[str, Any] = {"key": None, "plan": None, "model": None, "sites": {}}
# Sites kept per process (least recently used dropped first). Ray reuses a few actors for all
# simulated factories: with 100 factories an unbounded dict would keep 100 shards' state per
# actor. A Site is cheap to rebuild: the backbone is shared and stays loaded.
MAX_SITES = 8
SITE_KEYS = ("data-path", "factory", "data-format", "categories", "device")  # a deployed site


def _site_key(config: ExperimentConfig, node: Mapping[str, Any]) -> str:
    """Which Site a node config means, for the cache."""
    if "data-path" in node:
        return json.dumps({k: str(node.get(k, "")) for k in SITE_KEYS}, sort_keys=True)
    if "partition-id" not in node:
        raise ConfigError("node config has neither 'data-path' (a site's own folder) nor "
                          "'partition-id' (a simulated shard): start the supernode with "
                          "--node-config \"data-path='/path/to/images' factory='name'\"")
    factory_id, num = int(node["partition-id"]), config.federation.num_factories
    partitions = int(node.get("num-partitions", num))
    if partitions != num:
        raise ConfigError(f"this node is partition {factory_id} of {partitions} but "
                          f"federation.num_factories is {num}: start {num} supernodes")
    if not 0 <= factory_id < num:
        raise ConfigError(f"partition-id {factory_id} is out of range for "
                          f"federation.num_factories = {num}")
    return str(factory_id)


def actor_device(device: str) -> str:
    """The device a client computes on, decided in its own process. Inside a Ray actor (the
    simulation, `flwr run`'s local one, a Ray cluster) `auto` means CUDA only when Ray gave the
    actor a GPU share (federation.client_gpus > 0; Ray then sets CUDA_VISIBLE_DEVICES to it), and
    the CPU otherwise: a zero-GPU actor may still see every GPU (Ray leaves CUDA_VISIBLE_DEVICES
    alone there with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, which experiments/app/simulation.py sets
    and future Ray makes the default), and would land on GPU 0 outside Ray's accounting. Outside
    Ray, and for any explicit device, the setting is returned as it is."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs to
    if device != "auto" or ray is None or not ray.is_initialized():
        return device
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # a driver, not a client actor
        return device
    return device if context.get_accelerator_ids().get("GPU") else "cpu"


def _build_site(config: ExperimentConfig, node: Mapping[str, Any]) -> Site:
    if "data-path" in node:
        path = str(node["data-path"])
        name = str(node.get("factory") or path.rstrip("/").rsplit("/", 1)[-1])
        categories = tuple(c.strip() for c in str(node.get("categories", "")).split(",") if c.strip())
        return Site.from_folder(config, path, name, str(node.get("data-format", "")), categories,
                                device=str(node.get("device", "")) or actor_device(config.device),
                                model=_CACHE["model"])
    if _CACHE["plan"] is None:
        _CACHE["plan"] = plan_factories(config)
    plan = _CACHE["plan"]
    return Site(config, plan.shard(int(node["partition-id"])), plan.shifts, model=_CACHE["model"],
                root=plan.root, device=actor_device(config.device))


def site_for(config: ExperimentConfig, node: Mapping[str, Any]) -> Site:
    """The cached Site of (config, node config); one backbone per process, shared by its Sites
    (a Ray worker may serve several simulated factories, one message at a time)."""
    key = json.dumps(to_dict(config), sort_keys=True)
    if _CACHE["key"] != key:
        _CACHE.update(key=key, plan=None, model=None, sites={})
        torch.set_num_threads(max(1, int(config.federation.client_cpus)))
    sites: dict[str, Site] = _CACHE["sites"]
    which = _site_key(config, node)
    if which not in sites:
        while len(sites) >= MAX_SITES:
            sites.pop(next(iter(sites)))  # the least recently used
        sites[which] = _build_site(config, node)
    sites[which] = site = sites.pop(which)  # most recently used last
    if site._model is not None:  # a backbone built elsewhere (or handed in): share it
        _CACHE["model"] = site._model
    return site


def handle(message: Message, context: Context, defaults: Mapping[str, Any]) -> Message:
    """Any message: its records to the Site, the Site's reply records back."""
    config, _ = experiment_config({**defaults, **dict(context.run_config)})
    site = site_for(config, context.node_config)
    records = from_flower(message.content) if message.has_content() else {}
    reply = site.answer(message.metadata.message_type, records)
    if site._model is not None:  # built during this message: the next Site reuses it
        _CACHE["model"] = site._model
    return Message(to_flower(reply), reply_to=message)


def build_client_app(defaults: Mapping[str, Any] | None = None,
                     mods: list | None = None) -> ClientApp:
    """A ClientApp whose run config falls back to `defaults` (for `run_simulation`); `mods`
    are Flower mods around every handler (tests use one to record outgoing messages)."""
    baked = dict(defaults or {})
    client = ClientApp(mods=mods)

    @client.query()
    def query(message: Message, context: Context) -> Message:
        return handle(message, context, baked)

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return handle(message, context, baked)

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle(message, context, baked)

    return client


app = build_client_app()
