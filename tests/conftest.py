"""Shared test setup: no telemetry, a private FLWR_HOME, the real-data folder when present,
`@pytest.mark.cuda` tests skipped where there is no CUDA device, and the fast tier's guard (no Ray,
no server process when slow tests are deselected: tests/tier_guard.py)."""

import os
import tempfile
from pathlib import Path

import pytest

from tests import tier_guard

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpatch-flwr-home-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = REPO.parent / "shared" / "data" / "mvtec"


@pytest.fixture(scope="session")
def shared_mvtec() -> Path:
    """../shared/data/mvtec (tire, hazelnut); the test is skipped when it is absent."""
    if not (SHARED_MVTEC / "tire").is_dir() or not (SHARED_MVTEC / "hazelnut").is_dir():
        pytest.skip(f"real images not found at {SHARED_MVTEC}")
    return SHARED_MVTEC


def pytest_configure(config: pytest.Config) -> None:
    """A run that deselects `slow` tests (`make test-fast`) fails any test that starts Ray or a
    server process (tests/tier_guard.py)."""
    tier_guard.install(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests are skipped, with one plain reason, where torch sees no CUDA
    device. torch is imported only when such a test was collected."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in marked:
        item.add_marker(skip)
