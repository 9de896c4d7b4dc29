"""The GPU kit: everything one device call does on a bare GPU machine, in order, inside 9 minutes.

1. install: the wheels carried beside the working tree (`wheels/`, fetched by bench/gpu_wheels.sh) go into a
   private folder with `pip install --no-index --no-deps --target`, first on PYTHONPATH for every later step;
2. check: every package the steps import, at the versions they need, CUDA, and the code's own imports; a
   missing piece stops the kit within seconds, saying what is missing and how to carry it;
3. gpu_tests: `pytest -m gpu tests/gpu` (the fast decoder against generate(), start-up, out-of-memory);
4. shapes: bench/gpu_blip2_opt27b_shapes.py, the measurements at blip2-opt-2.7b's shapes.

Each step has its own time limit (they add up to under 540 s) and writes its JSON to --out as it finishes:
kit.json (the steps, the check, versions), gpu_test_*.json (what each GPU test compared), gpu_tests.xml,
gpu_shapes.json. `--small` is the same pipeline on the CPU with tiny widths, using the packages already
installed (no wheels): the GPU tests run on the CPU in fp32 (GPU_TESTS_ON_CPU=1; the out-of-memory one is
skipped), and the shapes step runs a few small cells.

    bash bench/gpu_session.sh            # on the device; SMALL=1 for the CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "bench" / "gpu_wheels.txt"
T0 = time.monotonic()

# Step limits (s), full run: they add up to 530, under the 540 s gpu_session.sh allows and a command's 600.
LIMITS = {"install": 45, "check": 45, "gpu_tests": 140, "shapes": 300}
SMALL_LIMITS = {"install": 5, "check": 40, "gpu_tests": 60, "shapes": 75}
# The measured LLM precisions, in the order they matter if the time runs out: fp16 (the reference), the
# 8-bit candidates that may match it (torchao int8 weight-only, FP8), then bitsandbytes (t0: no outliers).
MODES = ["fp16", "torchao-int8", "torchao-fp8", "bnb-int8-t0", "bnb-int8"]
# What every step imports that the GPU image is said to hold (a missing one stops the kit all the same).
IMAGE_MODULES = {
    "torch": "2.4",
    "transformers": "5.0",
    "accelerate": "1.1",
    "safetensors": "0.4",
    "tokenizers": "0.21",
    "PIL": "10",
    "numpy": "1.26",
    "yaml": "5",
    "pytest": "8",
}
CODE_MODULES = (
    "service.settings",
    "service.engine.loading",
    "service.engine.inference",
    "service.engine.batching",
    "training.assemble",
)


def log(message: str) -> None:
    print(f"[kit {time.monotonic() - T0:6.1f} s] {message}", flush=True)


def carried_wheels() -> list[tuple[str, str, str, bool]]:
    """(distribution, version, import name, is bitsandbytes) of each wheel gpu_wheels.txt lists."""
    rows = []
    for line in WHEEL_LIST.read_text().splitlines():
        fields = line.split()
        if fields and not line.startswith("#"):
            name, version = fields[0].split("==")
            rows.append((name, version, fields[1], len(fields) > 2 and fields[2] == "bnb"))
    return rows


def install(wheels: Path, site: Path) -> dict:
    """The carried wheels into `site`, offline. Without pip, a wheel is unzipped (what --target does for
    these wheels: none has scripts or data to place)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return {"installed": [], "note": f"no wheels in {wheels}: the packages must be installed already"}
    site.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade"]
    command += ["--target", str(site), *map(str, found)]
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        result = subprocess.run(command, capture_output=True, text=True, timeout=LIMITS["install"])
        if result.returncode != 0:
            raise SystemExit(f"kit: installing the carried wheels failed:\n{result.stderr[-2000:]}")
    else:
        for wheel in found:
            zipfile.ZipFile(wheel).extractall(site)
    return {
        "installed": [wheel.name for wheel in found],
        "by": "pip" if has_pip else "unzip",
        "site": str(site),
    }


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check(small: bool, without_bnb: bool) -> dict:
    """Runs in its own process (so the kit's process never holds a CUDA context): imports and versions."""
    import importlib
    import importlib.metadata

    found, problems = {}, []
    for module, least in IMAGE_MODULES.items():
        try:
            version = getattr(importlib.import_module(module), "__version__", "?")
        except ImportError as exc:
            problems.append(f"{module} is missing ({exc})")
            continue
        found[module] = version
        if version != "?" and _version_tuple(version) < _version_tuple(least):
            problems.append(f"{module} {version} is older than the {least} the steps need")
    for name, pinned, module, is_bnb in carried_wheels():
        if is_bnb and without_bnb:
            found[module] = "left out (GPU_KIT_WITHOUT_BNB=1)"
            continue
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"{name}=={pinned} is missing ({exc}): carry it (bash bench/gpu_wheels.sh)")
            continue
        found[module] = getattr(imported, "__version__", None) or importlib.metadata.version(name)
    for module in CODE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"the code's {module} does not import: {exc}")
    import torch

    facts: dict = {"versions": found, "python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        capability = torch.cuda.get_device_capability(0)
        facts |= {
            "device": properties.name,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "capability": list(capability),
            "fp8": capability >= (8, 9),
            "torch_cuda": torch.version.cuda,
        }
        if not without_bnb and "bitsandbytes" in found:
            try:  # its CUDA library loads and an 8-bit layer runs
                import bitsandbytes as bnb

                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).cuda()
                layer(torch.randn(2, 64, device="cuda", dtype=torch.float16))
            except Exception as exc:  # noqa: BLE001 - any failure here means the bnb steps cannot run
                problems.append(f"bitsandbytes does not run on this GPU: {exc!r}")
    elif not small:
        problems.append("no CUDA GPU is visible to torch (SMALL=1 runs the CPU check)")
    facts["problems"] = problems
    return facts


def run_step(name: str, command: list[str], limit: float, out: Path, env: dict) -> dict:
    """One step in its own process group, its output to <name>.log, killed at `limit` seconds."""
    log(f"{name}: {' '.join(command)} (at most {limit:.0f} s)")
    started = time.monotonic()
    with (out / f"{name}.log").open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            rc = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            rc = "timed out"
    lines = (out / f"{name}.log").read_text(errors="replace").splitlines()
    result = {"rc": rc, "seconds": round(time.monotonic() - started, 1), "tail": lines[-15:]}
    log(f"{name}: {rc} in {result['seconds']} s")
    return result


def junit_summary(path: Path) -> dict:
    """Passed / failed / skipped test names from pytest's JUnit XML."""
    if not path.exists():
        return {}
    summary: dict = {"passed": [], "failed": [], "skipped": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            summary["failed"].append(name)
        elif case.find("skipped") is not None:
            summary["skipped"].append(name)
        else:
            summary["passed"].append(name)
    return summary


def steps_environment(args: argparse.Namespace, report: dict) -> dict[str, str]:
    """The steps' environment: the carried wheels installed (not in the CPU run) and put first on the path,
    the report folder, no hub access. Records the install step in `report`."""
    env, paths = dict(os.environ), [str(REPO)]
    if args.small:
        report["steps"]["install"] = {
            "note": "SMALL=1: the CPU run uses the packages installed here; no wheels"
        }
        log(report["steps"]["install"]["note"])
    else:
        report["steps"]["install"] = install(args.wheels, args.site)
        paths.insert(0, str(args.site))  # the carried versions before any the image has
        log(f"install: {report['steps']['install']}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    env |= {"GPU_REPORT_DIR": str(args.out), "OUT": str(args.out), "HF_HUB_OFFLINE": "1"}
    if args.small:
        env["GPU_TESTS_ON_CPU"] = "1"  # the GPU tests' own code runs too, on the CPU in fp32
    return env


def shapes_command(
    args: argparse.Namespace, modes: list[str], without_bnb: bool, limit_s: float
) -> list[str]:
    """The shapes step's command line: the modes this machine can run, cells sized to end inside `limit_s`."""
    shapes = [sys.executable, "bench/gpu_blip2_opt27b_shapes.py", "--out", str(args.out)]
    if without_bnb:
        modes = [mode for mode in modes if not mode.startswith("bnb")]
    if args.small:
        modes = [mode for mode in modes if mode in ("fp16", "bnb-int8", "torchao-int8")]
        shapes += ["--small", "--batches", "1,2", "--greedy-batches", "2", "--tokens", "4", "--beams", "2"]
        shapes += ["--rounds", "1", "--budget-s", str(limit_s - 30)]
    else:
        # new cells stop starting in time for the running one to end inside the limit
        shapes += ["--rounds", "2", "--budget-s", str(limit_s - 60)]
    return shapes + ["--modes", ",".join(modes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="all", choices=["all", "check"])
    parser.add_argument("--small", action="store_true", help="the CPU run: tiny widths, installed packages")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or tempfile.gettempdir()))
    parser.add_argument("--wheels", type=Path, default=REPO / "wheels")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "blip2-gpu-kit-site")
    args = parser.parse_args(argv)
    without_bnb = bool(os.environ.get("GPU_KIT_WITHOUT_BNB"))
    # A second call can run what the first did not reach: GPU_KIT_STEPS=shapes GPU_KIT_MODES=bnb-int8,...
    steps = os.environ.get("GPU_KIT_STEPS", "gpu_tests,shapes").split(",")
    modes = os.environ.get("GPU_KIT_MODES", ",".join(MODES)).split(",")
    if args.command == "check":
        print(json.dumps(check(args.small, without_bnb)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    limits = SMALL_LIMITS if args.small else LIMITS
    report: dict = {"small": args.small, "limits_s": limits, "steps": {}}

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - T0, 1)
        (args.out / "kit.json").write_text(json.dumps(report, indent=1))

    env = steps_environment(args, report)
    save()

    checked = subprocess.run(
        [sys.executable, __file__, "check", *(["--small"] if args.small else [])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=limits["check"],
    )  # fmt: skip
    if checked.returncode != 0:
        report["steps"]["check"] = {"problems": [f"the check itself failed: {checked.stderr[-2000:]}"]}
    else:
        report["steps"]["check"] = json.loads(checked.stdout.splitlines()[-1])
    save()
    problems = report["steps"]["check"]["problems"]
    if problems:
        print(
            "kit: stopped, something the steps need is missing:\n  " + "\n  ".join(problems), file=sys.stderr
        )
        print(
            "kit: fetch the wheels with `bash bench/gpu_wheels.sh` and carry `wheels` with the tree",
            file=sys.stderr,
        )
        return 3
    log(f"check: {report['steps']['check']}")

    python = sys.executable
    if "gpu_tests" in steps:
        tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
        tests += ["--junitxml", str(args.out / "gpu_tests.xml")]
        if without_bnb:
            tests += ["-k", "not bnb and not gpu_defaults"]
        report["steps"]["gpu_tests"] = run_step("gpu_tests", tests, limits["gpu_tests"], args.out, env)
        report["steps"]["gpu_tests"]["tests"] = junit_summary(args.out / "gpu_tests.xml")
        save()
    if "shapes" not in steps:
        return finish(report, save, args.out)

    shapes = shapes_command(args, modes, without_bnb, limits["shapes"])
    report["steps"]["shapes"] = run_step("shapes", shapes, limits["shapes"], args.out, env)
    return finish(report, save, args.out)


def finish(report: dict, save, out: Path) -> int:
    failed = [name for name, step in report["steps"].items() if step.get("rc") not in (None, 0)]
    report["failed_steps"] = failed
    save()
    log(f"done: {'all steps passed' if not failed else 'failed: ' + ', '.join(failed)}; JSON in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
