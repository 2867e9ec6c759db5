"""Run folders and manifests: every run writes into a fresh folder and says how it was made.

A run folder is never reused: `new_run_dir` adds a suffix rather than overwrite anything, so a
failed or repeated command cannot destroy an earlier result. `manifest.json` records the
resolved config, the command, library versions, the git commit and timings.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from patchcore.config import to_dict
from patchcore.memory_bank import atomic_write_bytes

PACKAGES = ("fedpatch", "torch", "torchvision", "numpy", "scikit-learn", "scipy", "flwr", "ray", "safetensors")


def new_run_dir(output_dir: str | Path, kind: str, explicit: str | Path | None = None) -> Path:
    """A fresh folder `output_dir/<kind>-<UTC time>` (or `explicit`, which must not hold files)."""
    if explicit is not None:
        path = Path(explicit)
        if path.exists() and any(path.iterdir()):
            from patchcore.errors import ConfigError

            raise ConfigError(f"output folder {path} already holds files; choose another --out (nothing was overwritten)")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{kind}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def git_commit() -> dict[str, Any]:
    """The commit of the fedpatch source tree, and whether it had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_config(run_dir: Path, config: Any) -> Path:
    """The resolved config as YAML, loadable again with `--config`."""
    path = run_dir / "config.yaml"
    atomic_write_bytes(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    return path


def privacy_summary(config: Any) -> dict[str, Any]:
    """ε, δ, σ (and what they cover) of what this run's factories release; every manifest has it."""
    spec = config.privacy_spec() if hasattr(config, "privacy_spec") else None
    clip = getattr(getattr(getattr(config, "model", None), "transform", None), "clip_norm", None)
    if spec is None:
        return {"epsilon": None, "delta": None, "sigma": 0.0, "clip_norm": clip,
                "note": "differential privacy off: released vectors carry no noise"}
    return spec.to_dict()


class Manifest:
    """Collects what a run did; `write()` may be called repeatedly (atomic each time)."""

    def __init__(self, run_dir: Path, config: Any, kind: str):
        self.path = run_dir / "manifest.json"
        self.started = time.time()
        self.data: dict[str, Any] = {
            "kind": kind,
            "command": sys.argv,
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": to_dict(config),
            "seed": getattr(config, "seed", None),
            "versions": versions(),
            "git": git_commit(),
            "platform": platform.platform(),
            "privacy": privacy_summary(config),
            "timings_s": {},
        }

    def time(self, phase: str, seconds: float) -> None:
        self.data["timings_s"][phase] = round(self.data["timings_s"].get(phase, 0.0) + seconds, 3)

    def write(self, **extra: Any) -> Path:
        self.data.update(extra)
        self.data["wall_s"] = round(time.time() - self.started, 3)
        write_json(self.path, self.data)
        return self.path
