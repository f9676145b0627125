"""Imports only point down: plugins import mslim_core only; mslim_core imports no plugin and not mslim."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


CORE = sorted((ROOT / "mslim_core").rglob("*.py"))
PLUGINS = sorted((ROOT / "plugins").rglob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_plugin_and_not_mslim(path: Path) -> None:
    bad = {r for r in imported_roots(path) if r == "mslim" or r.startswith("mslim_") and r != "mslim_core"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", PLUGINS, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_only_core_and_itself(path: Path) -> None:
    own = path.relative_to(ROOT / "plugins").parts[0]
    bad = {r for r in imported_roots(path) if (r == "mslim" or r.startswith("mslim_")) and r not in {"mslim_core", own}}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
