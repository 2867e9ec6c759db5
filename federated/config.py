"""The experiment config: PatchCore's sections plus `federation`, strictly typed like the rest.

`federation` says how many factories there are, how images are split among them and shifted,
how much each factory sends and how the server aggregates, and what Ray gives each client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchcore.config import Config
from patchcore.errors import ConfigError

from federated.aggregation import METHODS as AGGREGATIONS
from federated.partition import SCHEMES


@dataclass(frozen=True)
class FederationConfig:
    num_factories: int = 4
    partition: str = "iid"  # iid | category | dirichlet | quantity
    alpha: float = 0.5  # dirichlet concentration
    quantity_exponent: float = 1.5  # quantity: share_k ∝ (k+1)^-exponent
    domain_shift: bool = False  # per-factory photometric + geometric shift
    shift_strength: float = 1.0
    local_ratio: float = 0.1  # each factory's coreset, as a fraction of its patches
    global_ratio: float = 0.1  # the global bank, as a fraction of all factories' patches
    aggregation: str = "coreset_of_coresets"  # coreset_of_coresets | concat | random
    payload_dtype: str = "float16"  # float16 | float32
    client_cpus: float = 1.0  # Ray resources per client actor
    client_gpus: float = 0.0
    ray_address: str = ""  # empty: a local Ray instance (or RAY_ADDRESS)
    node_timeout_s: float = 120.0  # how long the server waits for the expected nodes
    round_timeout_s: float = 3600.0  # how long it waits for replies in one round
    local_only: bool = True  # also fit each factory alone, for the comparison


@dataclass(frozen=True)
class ExperimentConfig(Config):
    federation: FederationConfig = field(default_factory=FederationConfig)

    def validate(self) -> None:
        super().validate()
        f = self.federation
        checks = [
            (f.num_factories >= 1, "federation.num_factories", "must be >= 1"),
            (f.partition in SCHEMES, "federation.partition", f"must be one of {', '.join(SCHEMES)}"),
            (f.alpha > 0, "federation.alpha", "must be > 0"),
            (0.0 < f.local_ratio <= 1.0, "federation.local_ratio", "must be in (0, 1]"),
            (0.0 < f.global_ratio <= 1.0, "federation.global_ratio", "must be in (0, 1]"),
            (f.aggregation in AGGREGATIONS, "federation.aggregation", f"must be one of {', '.join(AGGREGATIONS)}"),
            (f.payload_dtype in ("float16", "float32"), "federation.payload_dtype", "must be float16 or float32"),
            (f.client_cpus > 0 and f.client_gpus >= 0, "federation.client_cpus", "must be > 0 (client_gpus >= 0)"),
            (f.node_timeout_s > 0 and f.round_timeout_s > 0, "federation.node_timeout_s", "timeouts must be > 0"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key} {message}")
