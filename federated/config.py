"""The experiment config: PatchCore's sections plus `federation`, strictly typed like the rest.

`federation` says how many factories there are, how images are split among them and shifted,
how much each factory sends and how the server aggregates, and what Ray gives each client.

Import-light on purpose (no torch, no flwr): the CLI loads and checks a config before any heavy
library, so a typo is reported at once. The names the config accepts for aggregation, the
poisoning screen, shift families and payload encodings live here for that reason (the one list
of each): federated/aggregation.py, robust.py, shift.py and payload.py import them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from federated.faults import parse_faults
from federated.partition import SCHEMES
from patchcore.config import Config, Section, StrList, as_tuple, invalid

AGGREGATIONS: tuple[str, ...] = ("coreset_of_coresets", "concat", "random")  # federated/aggregation.py
POISON_MODES: tuple[str, ...] = ("off", "flag", "exclude", "filter")  # federated/robust.py
SHIFT_FAMILIES: tuple[str, ...] = ("photometric", "illumination", "geometric")  # federated/shift.py
PAYLOAD_DTYPES: tuple[str, ...] = ("float16", "float32", "int8")  # federated/payload.py
# federation.local_factor default. Measured (experiments/studies/federated_parity.md: tire, 10%
# global ratio, iid and category partitions): 2x and 4x bought no AUROC or coverage-radius parity
# over 1x, at 2x and 4x the upload; a factory's coreset is the global share of its patches.
LOCAL_FACTOR = 1.0


class PrivacyConfig(Section):
    """Differential privacy on the vectors a factory sends (federated/privacy.py). Off while
    epsilon is null; on, it needs model.transform.clip_norm (the same clipping then also applies
    to the centralized baseline, so comparisons stay fair)."""

    epsilon: float | None = Field(None, gt=0, description="privacy budget of what a factory sends (null: no "
                                                          "noise); needs model.transform.clip_norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="the (epsilon, delta) guarantee's failure probability")


class FederationConfig(Section):
    num_factories: int = Field(4, ge=1, description="simulated factories (one federated client each)")
    partition: Literal[SCHEMES] = Field(
        "iid", description="how images are split among factories: iid, category (each its own products), "
                           "dirichlet (label skew, see alpha), quantity (power-law sizes)")
    alpha: float = Field(0.5, gt=0, description="dirichlet partition: concentration (small: a few factories "
                                                "build most of a product)")
    quantity_exponent: float = Field(1.5, ge=0, description="quantity partition: factory k's share is "
                                                            "proportional to (k+1)^-exponent")
    domain_shift: bool = Field(False, description="give each factory its own camera: a seeded photometric, "
                                                  "illumination and geometric shift")
    shift_strength: float = Field(1.0, description="scale of the drawn domain shifts")
    shift_families: Annotated[tuple[Literal[SHIFT_FAMILIES], ...], BeforeValidator(as_tuple)] = Field(
        SHIFT_FAMILIES, min_length=1, description="which parts of a domain shift are applied")
    shifted_factories: int | None = Field(None, ge=0, description="only the first k factories are shifted "
                                                                  "(null: every factory)")
    # each factory's coreset, as a fraction of its patches; null: local_factor x global_ratio
    # (capped at 1), the multiple measured to give the centralized bank's AUROC at equal bank
    # size (experiments/studies/federated_parity.md)
    local_ratio: float | None = Field(None, gt=0, le=1, description="each factory's coreset as a share of its "
                                                                    "patches (null: local_factor x global_ratio)")
    local_factor: float = Field(LOCAL_FACTOR, ge=1, description="local_ratio when null: this multiple of "
                                                                "global_ratio, capped at 1")
    global_ratio: float = Field(0.1, gt=0, le=1, description="the global bank as a share of all factories' patches")
    aggregation: Literal[AGGREGATIONS] = Field(
        "coreset_of_coresets", description="how the server merges the factories' coresets: a coreset of "
                                           "their union, their concatenation, or a random subset")
    payload_dtype: Literal[PAYLOAD_DTYPES] = Field(
        "float16", description="encoding of the vectors a factory sends (int8: per-vector scale)")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="differential privacy")
    min_clients: int = Field(1, ge=1, description="fewer factories with valid payloads: the round fails, no bank")
    max_vectors: int | None = Field(None, ge=1, description="largest payload the server accepts, in vectors "
                                                            "(null: the local coreset size of its patches)")
    max_bytes: int | None = Field(None, ge=1, description="largest payload the server accepts, in bytes "
                                                          "(features + scales; null: no cap)")
    poison_mode: Literal[POISON_MODES] = Field(
        "flag", description="poisoning screen: off, flag (report only), exclude (drop the factory), filter "
                            "(drop its outlying vectors)")
    poison_quantile: float = Field(0.99, gt=0, le=1, description="screen statistic: this quantile of "
                                                                 "leave-one-out NN distances")
    poison_threshold: float = Field(3.5, gt=0, description="flag a factory whose robust z-score exceeds this")
    faults: StrList = Field((), description='injected faults, "K:kind" or "NAME:kind" (kind: crash, hang, '
                                            "empty, noise, defects; federated/faults.py)",
                            json_schema_extra={"allowed": "K < num_factories, each factory once"})
    hang_s: float = Field(600.0, ge=0, description="how long a hang fault sleeps, in seconds")
    client_cpus: float = Field(1.0, gt=0, description="Ray CPUs per client actor")
    client_gpus: float = Field(0.0, ge=0, description="Ray GPUs per client actor (fractions share a GPU)")
    ray_address: str = Field("", description='Ray cluster to join ("": a local Ray instance, or RAY_ADDRESS)')
    node_timeout_s: float = Field(120.0, gt=0, description="how long the server waits for the expected nodes")
    identify_timeout_s: float = Field(120.0, gt=0, description="how long the server waits for the sites to say "
                                                               "who they are")
    round_timeout_s: float = Field(3600.0, gt=0, description="how long the server waits for replies in the "
                                                             "train and evaluate rounds")
    local_only: bool = Field(True, description="compare: also fit each factory alone, for the comparison")

    @model_validator(mode="after")
    def _clients_and_faults(self) -> "FederationConfig":
        if self.min_clients > self.num_factories:
            raise invalid(f"must be <= federation.num_factories ({self.num_factories}), got {self.min_clients}",
                          "min_clients")
        parse_faults(self.faults, self.num_factories)  # ConfigError naming federation.faults
        return self

    @property
    def local(self) -> float:
        """The local coreset ratio in force: local_ratio, or local_factor x global_ratio."""
        if self.local_ratio is not None:
            return self.local_ratio
        return min(1.0, self.local_factor * self.global_ratio)


class ExperimentConfig(Config):
    federation: FederationConfig = Field(default_factory=FederationConfig, description="the federation")

    @model_validator(mode="after")
    def _privacy_needs_clipping(self) -> "ExperimentConfig":
        if self.federation.privacy.epsilon is not None and self.model.transform.clip_norm is None:
            raise invalid("needs model.transform.clip_norm (noise is calibrated to the clipped vectors)",
                          "federation.privacy.epsilon")
        return self

    def privacy_spec(self):  # -> federated.privacy.PrivacySpec | None
        """The (ε, δ, σ) of what factories release; None when privacy is off."""
        from federated.privacy import PrivacySpec

        p = self.federation.privacy
        if p.epsilon is None:
            return None
        return PrivacySpec.create(p.epsilon, p.delta, float(self.model.transform.clip_norm))
