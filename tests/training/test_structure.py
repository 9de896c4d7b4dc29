"""How training/ is put together: a module uses another's public names only, so each command module
(cli, evaluate, capfilt, finetune, ...) can change its insides without breaking another."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[2] / "training"


def _private_names_used(path: Path) -> list[str]:
    """`from training.x import _name`, or `x._name` after `from training import x`."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()  # local names bound to training modules
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("training")):
            for alias in node.names:
                if alias.name.startswith("_"):
                    used.append(f"{node.module}.{alias.name}")
                elif node.module == "training":
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if node.attr.startswith("_"):
                used.append(f"training.{node.value.id}.{node.attr}")
    return used


def test_no_training_module_imports_another_ones_private_names():
    found = {str(p.relative_to(TRAINING)): _private_names_used(p) for p in sorted(TRAINING.rglob("*.py"))}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_check_sees_a_private_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from training.evaluate import _device\nfrom training import trainer\ntrainer._JsonLog\n"
    )
    assert _private_names_used(sample) == ["training.evaluate._device", "training.trainer._JsonLog"]
