"""Small pieces several studies use: bank sizes, the standard centralized + federated pair."""

from __future__ import annotations

from typing import Any

import torch

from experiments.research.replay import Replay, TestSet
from experiments.research.study.core import Study


def sizes(banks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {c: int(len(b)) for c, b in banks.items()}


def both(study: Study, replay: Replay, condition: str, seed: int, factories: list[int] | None = None,
         test: dict[str, TestSet] | None = None, config: Any = None, coverage: bool = True,
         names: tuple[str, str] = ("centralized", "federated"),
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Centralized and federated banks of `factories` (default all), both scored on the same
    test images and added to the study's results under `condition`; returns (central, federated,
    federation report)."""
    config = config or replay.config
    factories = list(range(config.federation.num_factories)) if factories is None else factories
    central = replay.centralized(config, factories)
    extra = {"bank_size": sizes(central)}
    if coverage:
        extra["coverage_radius"] = replay.coverage(config, central)
    study.results.add_all(condition, names[0], seed, replay.scored(config, central, test), **extra)
    federated, report = replay.federated(config, factories)
    extra = {"bank_size": sizes(federated), "bytes_sent": report["bytes_sent"]}
    if coverage:
        extra["coverage_radius"] = replay.coverage(config, federated)
    study.results.add_all(condition, names[1], seed, replay.scored(config, federated, test), **extra)
    return central, federated, report
