"""Injected faults and hostile factories, for resilience studies and tests.

`federation.faults` lists entries "K:kind" (factory K misbehaves):

- `crash`: the client raises before sending anything (the server records it under "failed").
- `hang`: the client sleeps `federation.hang_s` before answering, longer than the round timeout
  should allow (the server records it under "missing" and goes on without it).
- `empty`: the factory joins with an empty shard: no training images, nothing to send ("missing",
  with that reason).
- `noise`: a poisoner that sends Gaussian noise with the norms of its honest coreset vectors.
- `defects`: a poisoner that builds its coreset from defective parts (to hide a defect class):
  its training images become its own defective test images, which leave its test set.

Faults are simulated by the sites themselves (federated/site.py) and the plan (`apply_to_shard`):
the server learns of them only as any real server would, from what arrives or does not.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from federated.partition import FactoryShard, factory_name
from patchcore.errors import ConfigError, FedpatchError

if TYPE_CHECKING:  # torch only where noise is made: the config validates faults without it
    import torch

KINDS: tuple[str, ...] = ("crash", "hang", "empty", "noise", "defects")


class InjectedFault(FedpatchError):
    """Raised by a site configured to crash."""


def parse_faults(entries: tuple[str, ...] | list[str], num_factories: int) -> dict[str, str]:
    """{factory name: kind} from ["K:kind" or "NAME:kind", ...]: K is a simulated factory's id
    (factory-K), NAME a deployed site's name; ConfigError naming federation.faults otherwise."""
    faults: dict[str, str] = {}
    for entry in entries:
        factory, sep, kind = str(entry).rpartition(":")
        factory = factory.strip()
        if not sep or not factory or kind.strip() not in KINDS:
            raise ConfigError(f"federation.faults entry {entry!r} must be 'K:kind' (K a factory "
                              f"id) or 'NAME:kind' (a site's name), kind one of {', '.join(KINDS)}")
        if factory.isdigit():
            k = int(factory)
            if not 0 <= k < num_factories:
                raise ConfigError(f"federation.faults entry {entry!r}: factory {k} does not exist "
                                  f"(federation.num_factories = {num_factories})")
            factory = factory_name(k)
        if factory in faults:
            raise ConfigError(f"federation.faults names factory {factory} twice")
        faults[factory] = kind.strip()
    return faults


def apply_to_shard(shard: FactoryShard, kind: str | None) -> FactoryShard:
    """The shard a faulty factory actually holds: `empty` has no training images; `defects`
    trains on its defective test images (which then leave its test set); others are unchanged."""
    if kind == "empty":
        return dataclasses.replace(shard, train=[], validation=[])
    if kind == "defects":
        defective = [dataclasses.replace(r, split="train") for r in shard.test if r.label == 1]
        good_tests = [r for r in shard.test if r.label == 0]
        return dataclasses.replace(shard, train=defective, test=good_tests, validation=[])
    return shard


def noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian vectors (n, D) with the row norms of `x`: a poisoner's random payload."""
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12) * x.norm(dim=1, keepdim=True)
