"""bench/gpu_session.sh, the GPU kit (bench/gpu_kit.py): its CPU run (`SMALL=1`) goes through every step, it
stops at once naming what is missing, and it installs carried wheels offline into a private folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gpu_kit  # noqa: E402


@pytest.mark.slow
def test_small_run_goes_through_every_step(tmp_path):
    env = os.environ | {"SMALL": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SMALL=1: the CPU run uses the packages installed here; no wheels" in result.stdout
    kit = json.loads((tmp_path / "kit.json").read_text())
    assert kit["failed_steps"] == [] and kit["steps"]["check"]["problems"] == []
    tests = kit["steps"]["gpu_tests"]["tests"]
    assert kit["steps"]["gpu_tests"]["rc"] == 0 and tests["passed"] and not tests["failed"]
    compared = json.loads(
        (tmp_path / "gpu_test_test_fast_decoder_answers_equal_generate_tiny-opt-fp16.json").read_text()
    )
    assert compared["share_equal"] == 1.0  # on the CPU in fp32 the fast decoder gives generate()'s tokens
    shapes = json.loads((tmp_path / "gpu_shapes_small.json").read_text())
    for mode in ("fp16", "bnb-int8", "torchao-int8"):
        cells = shapes[mode]
        assert cells["agreement_with_fp16"].endswith("/16")
        for decoder in ("fast", "transformers"):
            for label in ("batch_1", "batch_2", "greedy_batch_2"):
                assert cells[f"{decoder}/{label}"]["captions_per_s"] > 0, (mode, decoder, label)
    assert shapes["fp16"]["fast-graphs/batch_2"]["captions_per_s"] > 0
    assert "bitsandbytes" in shapes["bnb-int8"]["fast-graphs/skipped"]
    assert "torchao-fp8" not in shapes  # not asked for on the CPU


def test_missing_package_stops_the_kit_at_the_check(tmp_path):
    """bitsandbytes that does not import (as on a machine where its wheel was not carried), no wheels: the
    kit stops after the check, before any step, and says what is missing and how to carry it."""
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not carried')\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path / "shadow")}
    env.pop("GPU_KIT_WITHOUT_BNB", None)
    command = [sys.executable, "bench/gpu_kit.py", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert "bitsandbytes==0.50.2 is missing" in result.stderr and "bash bench/gpu_wheels.sh" in result.stderr
    kit = json.loads((tmp_path / "out" / "kit.json").read_text())
    assert set(kit["steps"]) == {"install", "check"}


def test_carried_wheels_install_offline_into_a_private_folder(tmp_path):
    """A wheel in the carried folder lands in the kit's site folder, with no index, and imports from there."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "kitprobe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("kitprobe/__init__.py", "VALUE = 22\n")
        info = "kitprobe-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: kitprobe\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    site = tmp_path / "site"
    installed = gpu_kit.install(wheels, site)
    assert installed["installed"] == ["kitprobe-1.0-py3-none-any.whl"]
    probe = subprocess.run(
        [sys.executable, "-c", "import kitprobe; print(kitprobe.VALUE, kitprobe.__file__)"],
        env=os.environ | {"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.split() == ["22", str(site / "kitprobe" / "__init__.py")]


def test_every_carried_wheel_is_listed_once_and_the_limits_fit_the_command():
    """The steps' limits leave the kit inside gpu_session.sh's 540 s, inside a command's 600 s."""
    names = [name for name, _, _, _ in gpu_kit.carried_wheels()]
    assert len(names) == len(set(names)) and "bitsandbytes" in names and "torchao" in names
    assert sum(gpu_kit.LIMITS.values()) < 540 and sum(gpu_kit.SMALL_LIMITS.values()) <= 180
    assert "timeout 540" in (REPO / "bench" / "gpu_session.sh").read_text()
