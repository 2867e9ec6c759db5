"""The factory plan: which images each factory owns, and how its camera shifts them.

Every process of a run (the server, each client, the centralized baseline) calls
`plan_factories(config)` and gets the same shards, because the plan is a pure function of the
config: records are listed from the dataset, partitioned all at once with the config's seed, and
shifts are drawn from that seed too. Nothing about the split travels over the network, so a
client can never be told to read another factory's images, and the baseline sees exactly the
union of what the factories saw. `experiment_config` reads the config the same way in every
process, from the Flower run config's "config" (YAML path), "overrides" (JSON) and "run-dir".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federated.config import ExperimentConfig
from federated.errors import PartitionError
from federated.partition import FactoryShard, partition
from federated.shift import DomainShift, shifts_for_factories
from patchcore.config import load_config
from patchcore.data.records import ImageRecord
from patchcore.data.sources import categories, data_root, load_records
from patchcore.errors import ConfigError


@dataclass
class FactoryPlan:
    """The shards of all factories and their domain shifts (empty when shifts are off)."""

    root: Path
    categories: list[str]
    shards: list[FactoryShard]  # index k is factory k
    shifts: dict[str, DomainShift]  # {factory name: shift}; {} without domain shift

    def shard(self, factory_id: int) -> FactoryShard:
        """Factory `factory_id`'s shard, or an error naming how many factories there are."""
        if not 0 <= factory_id < len(self.shards):
            raise PartitionError(f"factory id {factory_id} is out of range: the plan has "
                                 f"{len(self.shards)} factories (federation.num_factories)")
        return self.shards[factory_id]


def plan_factories(config: ExperimentConfig) -> FactoryPlan:
    """Load every category's records and split them into `federation.num_factories` shards.

    All categories are partitioned in one call, so the `category` and `dirichlet` schemes can
    spread products over factories jointly; the result depends on the config alone.
    """
    f = config.federation
    root = data_root(config.data, config.seed)
    names = categories(config.data, root)
    records: list[ImageRecord] = []
    for category in names:
        records.extend(load_records(config.data, root, category, config.threshold.holdout, config.seed))
    shards = partition(records, f.num_factories, f.partition, config.seed,
                       alpha=f.alpha, quantity_exponent=f.quantity_exponent)
    shifts = (shifts_for_factories(f.num_factories, config.seed, f.shift_strength, tuple(f.shift_families),
                                   f.shifted_factories) if f.domain_shift else {})
    return FactoryPlan(root=root, categories=list(names), shards=shards, shifts=shifts)


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or, when relative and absent from the working directory, relative
    to the project: `flwr run` starts the apps from an unpacked copy of the project whose
    working directory is not the project's, while `configs/` travels inside that copy."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    beside = Path(__file__).resolve().parents[1] / given
    return beside if beside.exists() else given


def parse_overrides(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config's "overrides": a JSON object of dotted keys ("" or None: none)."""
    if text is None or isinstance(text, Mapping):
        return dict(text or {})
    if not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config 'overrides' is not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"run config 'overrides' must be a JSON object of dotted keys, got {text!r}")
    return value


# Flat, typed run-config keys ([tool.flwr.app.config] in pyproject.toml, `--run-config`) for the
# settings people change per run: {key: (dotted config key, value meaning "keep the YAML's")}.
FLAT_KEYS: dict[str, tuple[str, Any]] = {
    "seed": ("seed", -1),
    "num-factories": ("federation.num_factories", 0),
    "min-clients": ("federation.min_clients", 0),
    "local-ratio": ("federation.local_ratio", 0.0),
    "global-ratio": ("federation.global_ratio", 0.0),
    "aggregation": ("federation.aggregation", ""),
    "payload-dtype": ("federation.payload_dtype", ""),
    "poison-mode": ("federation.poison_mode", ""),
    "node-timeout-s": ("federation.node_timeout_s", 0.0),
    "identify-timeout-s": ("federation.identify_timeout_s", 0.0),
    "round-timeout-s": ("federation.round_timeout_s", 0.0),
}
# Set by fedpatch's own drivers (Ray simulation, in-process): absent under `flwr run`, where
# Flower, not fedpatch, places the clients.
DRIVER_KEY = "fedpatch-driver"


def flat_overrides(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted key: value} for the flat keys that are set (not at their "keep" value)."""
    return {dotted: run_config[key] for key, (dotted, keep) in FLAT_KEYS.items()
            if key in run_config and run_config[key] != keep}


def experiment_config(run_config: Mapping[str, Any]) -> tuple[ExperimentConfig, Path | None]:
    """(config, run folder or None) from a Flower run config: "config" (YAML path), the flat
    keys, "overrides" (JSON of dotted keys, applied last) and "run-dir"; the way both apps learn
    what to do, whether started by `flwr run` or by fedpatch's drivers."""
    if "config" not in run_config:
        raise ConfigError("run config lacks config: set it in pyproject.toml "
                          "[tool.flwr.app.config] or with --run-config")
    path = resolve_config_path(str(run_config["config"]))
    overrides = {**flat_overrides(run_config), **parse_overrides(run_config.get("overrides"))}
    config = load_config(path, ExperimentConfig, overrides)
    run_dir = str(run_config.get("run-dir", "") or "")
    return config, (Path(run_dir).expanduser() if run_dir else None)
