"""Fixtures of the GPU tests of the serving path: only what a bare GPU machine holds with the kit's carried
wheels (torch, transformers, pydantic-settings, bitsandbytes, torchao; no fastapi, uvicorn, scikit-image or
pymilvus), so `bash bench/gpu_session.sh` can run them there. tests/service's fixtures import the web stack.

Every test here is marked `gpu` and skipped without CUDA. Each writes what it compared to
$GPU_REPORT_DIR/<test>.json when that is set (the kit sets it to $OUT), so a run reports figures, not only
a pass."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# GPU_TESTS_ON_CPU=1: the same tests on the CPU in fp32 (what can run there), to check the tests themselves
# before GPU minutes are spent on them.
ON_CPU = os.environ.get("GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()
DEVICE = "cpu" if ON_CPU else "cuda"


def pytest_collection_modifyitems(items) -> None:
    # pytest hands this hook every collected item of the session, not only this folder's: mark only ours.
    here = Path(__file__).parent
    needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
            item.add_marker(needs_cuda)


@pytest.fixture(scope="session")
def tiny_opt_generation(tiny_opt) -> Path:
    return tiny_opt / "generation"


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """16 images: noise and flat colours with a square, made here (nothing to download)."""
    rng = np.random.default_rng(22)
    made = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(8)]
    for n in range(8):
        image = Image.new("RGB", (224, 224), (30 * n, 255 - 30 * n, 90))
        image.paste((255 - 20 * n, 40, 20 * n), (40 + 8 * n, 40, 140 + 8 * n, 140))
        made.append(image)
    return made


@pytest.fixture
def report(request):
    """Collects a test's figures and writes them to $GPU_REPORT_DIR/<test>.json at its end, pass or fail."""
    figures: dict = {}
    yield figures
    folder = os.environ.get("GPU_REPORT_DIR")
    if folder:
        # plain characters only: the device tool brings back no file whose name has others (brackets)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name).strip("_")
        (Path(folder) / f"gpu_test_{name}.json").write_text(json.dumps(figures, indent=1, default=str))
