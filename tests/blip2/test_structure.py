"""The architecture's one rule in imports: the core package (blip2/) imports neither side, and neither
side imports the other; what both must compute alike lives in the core (docs: DESIGN.md). Inside the
server, the engine imports nothing of its HTTP face."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"blip2": {"training", "service"}, "service": {"training"}, "training": {"service"}}


def imported_modules(folder: str) -> dict[str, set[str]]:
    """Per module under `folder`, the modules it imports, dotted (relative imports stay inside)."""
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[str(path.relative_to(REPO))] = names
    return found


def imported_packages(package: str) -> dict[str, set[str]]:
    """Per module of `package`, the top-level packages it imports."""
    return {
        module: {name.split(".")[0] for name in names} for module, names in imported_modules(package).items()
    }


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


# The engine (models, batching, the gallery store) knows nothing of HTTP; service/api/ is its HTTP face.
ENGINE = "service/engine"
HTTP = ("fastapi", "starlette", "service.api")


def test_the_engine_imports_no_http():
    def http(name: str) -> bool:
        return any(name == face or name.startswith(face + ".") for face in HTTP)

    crossing = {
        module: sorted(filter(http, names))
        for module, names in imported_modules(ENGINE).items()
        if any(map(http, names))
    }
    assert crossing == {}
