"""Optional features and the pip extras that install them (pyproject.toml
`[project.optional-dependencies]`): `fedpatch serve` needs `serve`, `fedpatch dashboard` needs
`dashboard`. The core install (fit, evaluate, predict, compare, federate, deploy) needs neither;
a command whose extra is missing stops with one line naming the pip command (exit 2)."""

from __future__ import annotations

import importlib.util

from patchcore.errors import FedpatchError

# extra -> {distribution: the module names it may provide (any one will do)}
EXTRAS: dict[str, dict[str, tuple[str, ...]]] = {
    "serve": {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",),
              "python-multipart": ("python_multipart", "multipart")},  # multipart: before 0.0.13
    "dashboard": {"streamlit": ("streamlit",)},
}


class MissingExtraError(FedpatchError):
    """A command needs packages of an optional extra that are not installed."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None  # None in sys.modules: not importable
    except (ImportError, ValueError):
        return False


def require(extra: str, command: str) -> None:
    """MissingExtraError, one line, when a package of `extra` cannot be imported."""
    missing = [dist for dist, modules in EXTRAS[extra].items()
               if not any(_importable(m) for m in modules)]
    if missing:
        raise MissingExtraError(f"`{command}` needs {', '.join(missing)}, not installed: "
                                f"pip install 'fedpatch[{extra}]'")
