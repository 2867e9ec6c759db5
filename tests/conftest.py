"""Shared test setup: no telemetry, a private FLWR_HOME, the real-data folder when present."""

import os
import tempfile
from pathlib import Path

import pytest

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
