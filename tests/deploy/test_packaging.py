"""pyproject.toml's extras: `serve` installs everything `service/` imports, `train` everything `training/`
imports, neither needs the other, and `test` (what `make` installs) pulls in both."""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from _deploy import REPO
from packaging.requirements import Requirement

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Imported inside a try or a function, for one optional path, and in no extra but `test` (easy_vqa):
# torchvision (a faster image processor, PIL otherwise), easy_vqa (`blip2-train data easy-vqa`),
# matplotlib (the easy-VQA recipe's curves).
OPTIONAL = {"torchvision", "easy_vqa", "matplotlib"}
TRAINING_ONLY = {"pycocoevalcap", "peft", "webdataset"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _imports(package: str) -> set[str]:
    """The top-level modules that package's files import, other than the standard library and the project."""
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"blip2", "service", "training", "__future__"}


@functools.cache
def _closure(extra: str) -> frozenset[str]:
    """Every distribution `pip install .[extra]` installs: the core, the extra, and what they require."""
    todo = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"][extra]]
    todo = [r for r in todo if not r.startswith("blip2-stack")]
    seen: set[str] = set()
    while todo:
        requirement = Requirement(todo.pop())
        name = _name(str(requirement))
        if name in seen:
            continue
        seen.add(name)
        for sub in metadata.requires(name) or []:
            sub_requirement = Requirement(sub)
            environment = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
            if sub_requirement.marker is None or any(sub_requirement.marker.evaluate(e) for e in environment):
                todo.append(sub)
    return frozenset(seen)


def _distributions(module: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", d).lower() for d in metadata.packages_distributions().get(module, [])}


@pytest.mark.parametrize(("package", "extra"), [("service", "serve"), ("training", "train")])
def test_extra_installs_what_the_package_imports(package, extra):
    modules = _imports(package) - OPTIONAL
    assert modules, package
    missing = {m for m in modules if not _distributions(m) & _closure(extra)}
    assert not missing, f"{package}/ imports {sorted(missing)}, which .[{extra}] does not install"


def test_serving_extra_has_no_training_package():
    assert not _closure("serve") & TRAINING_ONLY
    assert TRAINING_ONLY <= {_name(r) for r in PROJECT["optional-dependencies"]["train"]}


def test_core_is_what_both_packages_need():
    """The core holds what both packages need (the model stack), and each package is listed once."""
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert core >= {"torch", "transformers", "safetensors", "tokenizers", "pillow", "numpy"}
    serve = {_name(r) for r in PROJECT["optional-dependencies"]["serve"]}
    train = {_name(r) for r in PROJECT["optional-dependencies"]["train"]}
    assert not core & (serve | train) and not serve & train, "each package in one place"


def test_test_extra_sets_up_everything():
    test = PROJECT["optional-dependencies"]["test"]
    assert any(_name(r) == "blip2-stack" and Requirement(r).extras == {"serve", "train"} for r in test), (
        "make installs .[test]: it must bring the server and the trainer"
    )


def test_metadata_builds_without_a_license_deprecation(tmp_path):
    """`project.license` is an SPDX expression: the table form makes every install warn (setuptools >= 77)
    that builds will fail from 2027-02-18. The metadata is built here with the installed setuptools."""
    assert isinstance(PROJECT["license"], str)
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert any(
        Requirement(r).name == "setuptools" and Requirement(r).specifier.contains("77")
        for r in build["requires"]
    )
    for name in ("pyproject.toml", "README.md"):
        (tmp_path / name).write_text((REPO / name).read_text())
    script = (
        "import warnings\n"
        "from setuptools import build_meta\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    build_meta.prepare_metadata_for_build_wheel('.')\n"
        "print('\\n'.join(str(w.message) for w in caught))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "license" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    (info,) = tmp_path.glob("*.dist-info")
    assert "License-Expression: Apache-2.0" in (info / "METADATA").read_text()


def _make_dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make TARGET` runs from nothing (a venv that does not exist yet), without running them."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    # --no-print-directory: under `make test` this make is a sub-make, which would print its directory.
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", target, f"VENV={venv}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_make_serve_installs_the_serve_extra_only(tmp_path):
    commands = _make_dry_run("serve", tmp_path / "venv")
    extras = re.findall(r'-e "\.\[([\w,]+)\]"', "\n".join(commands))
    assert extras == ["serve"], commands
    assert commands[-1].startswith(f"{tmp_path / 'venv'}/bin/blip2-serve"), commands


def test_make_test_sets_up_everything_from_nothing(tmp_path):
    commands = _make_dry_run("test", tmp_path / "venv")
    assert commands[0].startswith("python3 -m venv"), commands
    assert re.findall(r'-e "\.\[([\w,]+)\]"', "\n".join(commands)) == ["serve", "test"], commands
    assert commands[-1].endswith("-m pytest -q -x tests"), commands
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test"), "CI runs the README's command"


def test_only_the_gpu_tests_are_marked_gpu():
    """The `gpu` marker (skipped without CUDA) stays on GPU tests: a conftest hook that marked every collected
    item once skipped the whole CPU suite while CI still passed."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert any(t.startswith("tests/gpu/") for t in collected), done.stdout
    # Outside tests/gpu, only tests whose own module marks them.
    marked_elsewhere = {t.split("::")[0] for t in collected if not t.startswith("tests/gpu/")}
    assert all("pytest.mark.gpu" in (REPO / module).read_text() for module in marked_elsewhere), (
        marked_elsewhere
    )
