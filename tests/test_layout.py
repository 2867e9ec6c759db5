"""The README's layout table matches the tree, and imports flow one way between the rooms:
patchcore <- federated <- clients/server <- experiments/app <- experiments/research, bench."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# room -> the rooms it must never import (by top-level module path prefix)
FORBIDDEN = {
    "patchcore": ("federated", "clients", "server", "experiments"),
    "federated": ("clients", "server", "experiments"),
    "clients": ("server", "experiments"),
    "server": ("clients", "experiments"),
    "experiments/app": ("experiments.research", "experiments.bench"),
}


def _table_folders() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return [name.rstrip("/") for row in re.findall(r"^\| (.+?) \|", section, re.M)
            for name in re.findall(r"`([^`]+/)`", row)]


def test_layout_table_names_every_room_and_nothing_else():
    listed = set(_table_folders())
    assert listed, "no folders found in the README's layout table"
    for folder in listed:
        assert (REPO / folder).is_dir(), f"README layout names {folder}/, which does not exist"
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} | {"configs", "tests"}
    rooms = {f"experiments/{p.name}" for p in (REPO / "experiments").iterdir()
             if p.is_dir() and not p.name.startswith(("_", "."))}
    missing = (packages - {"experiments"} | rooms) - listed
    assert not missing, f"folders missing from the README's layout table: {sorted(missing)}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_imports_flow_one_way():
    offences = []
    for room, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / room).rglob("*.py")):
            for name in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    offences.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offences, "\n".join(offences)


def test_the_import_check_catches_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from experiments.research.sweeps import run_sweep\nimport federated.rounds\n")
    assert {"experiments.research.sweeps", "federated.rounds"} <= _imports(bad)
