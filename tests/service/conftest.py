"""Fixtures for the server tests; the helpers they use live in servertools.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servertools import PHOTOS, build_instructblip, photo, running_app, settings_for


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """tiny-opt and tiny-t5 presets (`stage1/` + `generation/`) and a tiny InstructBLIP built from configs."""
    from training.assemble import preset

    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for name in ("tiny-opt", "tiny-t5"):
        preset(name).save(root / name)
        folders[name] = root / name
    folders["instructblip"] = build_instructblip(root / "tiny-opt", root / "instructblip")
    return folders


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    # Shrunk copies: the tiny models read 64 px anyway, and small PNGs keep the tests quick.
    return [photo(name).resize((96, 96)) for name in PHOTOS]


@pytest.fixture(scope="session")
def opt8(checkpoints) -> Iterator[TestClient]:
    """The main app: tiny-opt generation model with its LLM in 8-bit (bitsandbytes on the CPU) + retrieval."""
    folder = checkpoints["tiny-opt"]
    # No vision cache here: batched-vs-alone tests then run every image through the ViT in its batch.
    settings = settings_for(
        folder / "generation", folder / "stage1", load_in_8bit=True, max_batch_size=8, vision_cache_size=0
    )
    with running_app(settings) as client:
        yield client
