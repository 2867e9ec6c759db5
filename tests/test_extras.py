"""Optional extras: `fedpatch serve` / `fedpatch dashboard` without their packages stop with one
line naming the pip command (exit 2); the core commands import none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.app.cli import main

REPO = Path(__file__).resolve().parents[1]
EXTRA_ONLY = ("fastapi", "uvicorn", "starlette", "streamlit", "python_multipart", "multipart")
# the only modules of ours that may import an extra's package at import time (the CLI imports
# them inside the commands that need them)
MAY_IMPORT = {"experiments/app/serve.py", "experiments/app/dashboard/app.py"}


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """As if `modules` were not installed (None in sys.modules: `import` raises ImportError), and
    serve.py not yet imported."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "experiments.app.serve", raising=False)


@pytest.mark.parametrize("blocked, named", [
    (("fastapi",), "fastapi"),
    (("uvicorn",), "uvicorn"),
    (("python_multipart", "multipart"), "python-multipart"),
])
def test_serve_without_its_extra_is_one_line_and_exit_2(blocked, named, tmp_path, monkeypatch, capsys):
    _block(monkeypatch, *blocked)
    assert main(["serve", str(tmp_path / "tire.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: `fedpatch serve` needs {named}, not installed: pip install 'fedpatch[serve]'"]


def test_dashboard_without_streamlit_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    _block(monkeypatch, "streamlit")
    monkeypatch.setattr("subprocess.call", lambda cmd: pytest.fail(f"started {cmd}"))
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: `fedpatch dashboard` needs streamlit, not installed: "
                   "pip install 'fedpatch[dashboard]'"]


def test_with_the_extras_installed_nothing_is_refused():
    from experiments.app.extras import EXTRAS, require

    for extra in EXTRAS:  # `make test` installs .[dev]: both extras
        require(extra, f"fedpatch {extra}")


def _imported_at_module_level(path: Path) -> set[str]:
    """Top-level packages a module imports when it is imported (not inside functions)."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text(), str(path)).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # still module level
            for field in ("body", "orelse", "finalbody", "handlers"):
                body += getattr(node, field, [])
        elif isinstance(node, ast.ExceptHandler):
            body += node.body
    return names


def test_only_serve_and_the_dashboard_app_import_extra_packages():
    offenders = {}
    for folder in ("patchcore", "federated", "clients", "server", "experiments"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            found = _imported_at_module_level(path) & set(EXTRA_ONLY)
            if found and rel not in MAY_IMPORT:
                offenders[rel] = sorted(found)
    assert not offenders, f"import these lazily (an optional extra): {offenders}"


def test_core_commands_import_without_streamlit_or_python_multipart():
    """A core install has fastapi and uvicorn (flwr needs them) but neither streamlit (nor pandas,
    which comes with it) nor python-multipart: the core commands' modules import without them."""
    probe = """
import sys
for name in ("streamlit", "pandas", "python_multipart", "multipart"):
    sys.modules[name] = None
from experiments.app import cli, compare, federate, predict, simulation, deploy, runs, reports
from patchcore import fitting, model
from experiments.app.cli import main
sys.exit(main(["serve", "x.safetensors"]))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: `fedpatch serve` needs python-multipart, not installed: pip install 'fedpatch[serve]'")
