"""The experiment config: PatchCore's sections plus `federation`, strictly typed like the rest.

`federation` says how many factories there are, how images are split among them and shifted,
how much each factory sends and how the server aggregates, and what Ray gives each client.

Import-light on purpose (no torch, no flwr): the CLI loads and checks a config before any heavy
library, so a typo is reported at once. The names the config accepts for aggregation and the
poisoning screen live here for that reason; federated/aggregation.py and robust.py import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchcore.config import Config
from patchcore.errors import ConfigError

from federated.faults import parse_faults
from federated.partition import SCHEMES

AGGREGATIONS: tuple[str, ...] = ("coreset_of_coresets", "concat", "random")  # federated/aggregation.py
POISON_MODES: tuple[str, ...] = ("off", "flag", "exclude", "filter")  # federated/robust.py
# federation.local_factor default. Measured (experiments/studies/federated_parity.md: tire, 10%
# global ratio, iid and category partitions): 2x and 4x bought no AUROC or coverage-radius parity
# over 1x, at 2x and 4x the upload; a factory's coreset is the global share of its patches.
LOCAL_FACTOR = 1.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy on the vectors a factory sends (federated/privacy.py). Off while
    epsilon is null; on, it needs model.transform.clip_norm (the same clipping then also applies
    to the centralized baseline, so comparisons stay fair)."""

    epsilon: float | None = None  # null: no noise
    delta: float = 1e-5


@dataclass(frozen=True)
class FederationConfig:
    num_factories: int = 4
    partition: str = "iid"  # iid | category | dirichlet | quantity
    alpha: float = 0.5  # dirichlet concentration
    quantity_exponent: float = 1.5  # quantity: share_k ∝ (k+1)^-exponent
    domain_shift: bool = False  # per-factory photometric + geometric shift
    shift_strength: float = 1.0
    shift_families: tuple[str, ...] = ("photometric", "illumination", "geometric")  # which parts of a shift
    shifted_factories: int | None = None  # only the first k factories are shifted (null: all)
    # each factory's coreset, as a fraction of its patches; null: local_factor x global_ratio
    # (capped at 1), the multiple measured to give the centralized bank's AUROC at equal bank
    # size (experiments/studies/federated_parity.md)
    local_ratio: float | None = None
    local_factor: float = LOCAL_FACTOR
    global_ratio: float = 0.1  # the global bank, as a fraction of all factories' patches
    aggregation: str = "coreset_of_coresets"  # coreset_of_coresets | concat | random
    payload_dtype: str = "float16"  # float32 | float16 | int8 (per-vector scale)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    min_clients: int = 1  # fewer factories with valid payloads: the round fails, no bank
    max_vectors: int | None = None  # per payload; null: the local coreset size of its patches
    max_bytes: int | None = None  # per payload (features + scales as sent); null: no cap
    poison_mode: str = "flag"  # off | flag (report only) | exclude | filter (drop outlying vectors)
    poison_quantile: float = 0.99  # statistic: this quantile of leave-one-out NN distances (robust.py)
    poison_threshold: float = 3.5  # flag a factory whose robust z-score exceeds this
    faults: tuple[str, ...] = ()  # injected faults "K:kind" (federated/faults.py)
    hang_s: float = 600.0  # how long a `hang` fault sleeps
    client_cpus: float = 1.0  # Ray resources per client actor
    client_gpus: float = 0.0
    ray_address: str = ""  # empty: a local Ray instance (or RAY_ADDRESS)
    node_timeout_s: float = 120.0  # how long the server waits for the expected nodes
    identify_timeout_s: float = 120.0  # how long it waits for the sites to say who they are
    round_timeout_s: float = 3600.0  # how long it waits for replies in the train and evaluate rounds
    local_only: bool = True  # also fit each factory alone, for the comparison

    @property
    def local(self) -> float:
        """The local coreset ratio in force: local_ratio, or local_factor x global_ratio."""
        if self.local_ratio is not None:
            return self.local_ratio
        return min(1.0, self.local_factor * self.global_ratio)


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
            (len(f.shift_families) > 0 and set(f.shift_families) <= {"photometric", "illumination", "geometric"},
             "federation.shift_families", "must name some of photometric, illumination, geometric"),
            (f.shifted_factories is None or f.shifted_factories >= 0, "federation.shifted_factories",
             "must be >= 0 (null: every factory)"),
            (f.local_ratio is None or 0.0 < f.local_ratio <= 1.0, "federation.local_ratio", "must be in (0, 1] (null: local_factor x global_ratio)"),
            (f.local_factor >= 1.0, "federation.local_factor", "must be >= 1 (a factory keeps at least the global share)"),
            (0.0 < f.global_ratio <= 1.0, "federation.global_ratio", "must be in (0, 1]"),
            (f.aggregation in AGGREGATIONS, "federation.aggregation", f"must be one of {', '.join(AGGREGATIONS)}"),
            (f.payload_dtype in ("float32", "float16", "int8"), "federation.payload_dtype", "must be float32, float16 or int8"),
            (f.min_clients >= 1, "federation.min_clients", "must be >= 1"),
            (f.min_clients <= f.num_factories, "federation.min_clients", "must be <= federation.num_factories"),
            (f.max_vectors is None or f.max_vectors >= 1, "federation.max_vectors", "must be >= 1"),
            (f.max_bytes is None or f.max_bytes >= 1, "federation.max_bytes", "must be >= 1"),
            (f.poison_mode in POISON_MODES, "federation.poison_mode", f"must be one of {', '.join(POISON_MODES)}"),
            (0.0 < f.poison_quantile <= 1.0, "federation.poison_quantile", "must be in (0, 1]"),
            (f.poison_threshold > 0, "federation.poison_threshold", "must be > 0"),
            (f.hang_s >= 0, "federation.hang_s", "must be >= 0"),
            (f.privacy.epsilon is None or f.privacy.epsilon > 0, "federation.privacy.epsilon", "must be > 0 (null: off)"),
            (0.0 < f.privacy.delta < 1.0, "federation.privacy.delta", "must be in (0, 1)"),
            (f.privacy.epsilon is None or self.model.transform.clip_norm is not None, "federation.privacy.epsilon",
             "needs model.transform.clip_norm (noise is calibrated to the clipped vectors)"),
            (f.client_cpus > 0 and f.client_gpus >= 0, "federation.client_cpus", "must be > 0 (client_gpus >= 0)"),
            (f.node_timeout_s > 0, "federation.node_timeout_s", "must be > 0"),
            (f.identify_timeout_s > 0, "federation.identify_timeout_s", "must be > 0"),
            (f.round_timeout_s > 0, "federation.round_timeout_s", "must be > 0"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key} {message}")
        parse_faults(f.faults, f.num_factories)

    def privacy_spec(self):  # -> federated.privacy.PrivacySpec | None
        """The (ε, δ, σ) of what factories release; None when privacy is off."""
        from federated.privacy import PrivacySpec

        p = self.federation.privacy
        if p.epsilon is None:
            return None
        return PrivacySpec.create(p.epsilon, p.delta, float(self.model.transform.clip_norm))
