"""The architecture's one rule in imports: the core package (blip2/) imports neither side, and neither
side imports the other; what both must compute alike lives in the core (docs: DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"blip2": {"training", "service"}, "service": {"training"}, "training": {"service"}}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Per module of `package`, the top-level packages it imports (relative imports stay inside)."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_follow_the_architecture(package):
    crossing = {
        module: sorted(names & FORBIDDEN[package])
        for module, names in imported_packages(package).items()
        if names & FORBIDDEN[package]
    }
    assert crossing == {}


def test_both_sides_import_the_core():
    for package in ("training", "service"):
        assert any("blip2" in names for names in imported_packages(package).values()), package
