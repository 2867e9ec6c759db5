"""Run folders and manifests: every run writes into a fresh folder and says how it was made.

A run folder is never reused: `new_run_dir` adds a suffix rather than overwrite anything, so a
failed or repeated command cannot destroy an earlier result. `manifest.json` records the
resolved config, the command, library versions, the git commit and timings.

A run that fails says so. Every folder `new_run_dir` opens and every `Manifest` is remembered
for the command in progress; `failures_recorded` (around each CLI command) closes the ones not
complete when an exception ends it: a folder that holds results keeps them, and its manifest
gets status "failed" (or "interrupted"), the one-line error the CLI prints and the wall time; a
folder with nothing but our own config.yaml / manifest.json (the failure came before any work)
is removed, so no empty run folders pile up. Nothing that holds a result is ever deleted.

This module imports no torch: the CLI uses it before any heavy library loads.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from patchcore import strict_json
from patchcore.config import to_dict

PACKAGES = ("fedpatch", "torch", "torchvision", "numpy", "scikit-learn", "scipy", "flwr", "ray", "safetensors")


def new_run_dir(output_dir: str | Path, kind: str, explicit: str | Path | None = None) -> Path:
    """A fresh folder `output_dir/<kind>-<UTC time>` (or `explicit`, which must not hold files)."""
    if explicit is not None:
        path = Path(explicit)
        if path.exists() and any(path.iterdir()):
            from patchcore.errors import ConfigError

            raise ConfigError(f"output folder {path} already holds files; "
                              "choose another --out (nothing was overwritten)")
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        _OPENED.append(_Opened(path, created))
        return path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{kind}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    _OPENED.append(_Opened(path, created=True))
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
    """Strict JSON (NaN/inf -> null: patchcore/strict_json.py), written atomically."""
    from patchcore.memory_bank import atomic_write_bytes

    atomic_write_bytes(path, strict_json.dumps(payload).encode())


def write_config(run_dir: Path, config: Any) -> Path:
    """The resolved config as YAML, loadable again with `--config`."""
    from patchcore.memory_bank import atomic_write_bytes

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
        _opened(run_dir).manifest = self
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


@dataclass
class _Opened:
    """A run folder this process opened, until its command ends."""

    path: Path
    created: bool  # False: an explicit --out that already existed (empty); never removed
    manifest: Manifest | None = None


_OPENED: list[_Opened] = []  # the folders of the command in progress (see `failures_recorded`)
OUR_FILES = ("manifest.json", "config.yaml")  # what a run folder holds before any work


def _opened(run_dir: Path) -> _Opened:
    for entry in _OPENED:
        if entry.path.resolve() == Path(run_dir).resolve():
            return entry
    _OPENED.append(_Opened(Path(run_dir), created=False))
    return _OPENED[-1]


@contextmanager
def failures_recorded(describe: Callable[[BaseException], tuple[str, str] | None]) -> Iterator[None]:
    """Around one command: if an exception ends it, close the run folders it opened and did not
    complete. `describe(exc)` gives (status, one-line error), or None for no failure (exit 0)."""
    since = len(_OPENED)
    try:
        yield
    except BaseException as exc:
        outcome = describe(exc)
        if outcome is not None:
            for entry in _OPENED[since:]:
                close_failed(entry, *outcome)
        raise
    finally:
        del _OPENED[since:]


def close_failed(entry: _Opened, status: str, error: str) -> None:
    """A failed run's folder: removed when it holds no results, else its manifest says why."""
    manifest = entry.manifest
    if manifest is not None and manifest.data.get("status") == "complete":
        return
    if not entry.path.is_dir():
        return
    if not _holds_results(entry.path) and _remove_empty(entry.path, entry.created):
        return
    if manifest is not None:
        try:
            manifest.write(status=status, error=error)
        except OSError:  # a full or vanished disk: the command's own error is the one to report
            pass


def _holds_results(path: Path) -> bool:
    """Anything but our config.yaml / manifest.json (empty sub-folders do not count)."""
    for dirpath, _, files in os.walk(path):
        if any(Path(dirpath) != path or name not in OUR_FILES for name in files):
            return True
    return False


def _remove_empty(path: Path, created: bool) -> bool:
    """Remove our own files and the empty folders only (never a tree): True when all went."""
    try:
        for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):  # deepest first
            if Path(dirpath) != path:
                os.rmdir(dirpath)  # fails on anything that appeared meanwhile
        if _holds_results(path):
            return False
        for name in OUR_FILES:
            (path / name).unlink(missing_ok=True)
        if created:
            path.rmdir()
    except OSError:
        return False
    return True
