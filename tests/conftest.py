"""Fixtures shared by every test package: tiny checkpoints and a small real image-caption set.

Nothing here touches a network: tiny models are built from configs and saved with
`save_pretrained`, then loaded through the same code path a user's checkpoint takes.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: tests start servers and torchrun workers beside pytest on 2 cores, and torch's
# spin-waiting threads then slow every process down many times over (measured in the recipe: 20x).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size // 2)
    x, y = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    if shape == "circle":
        draw.ellipse([x, y, x + extent, y + extent], fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle([x, y, x + extent, y + extent], fill=COLOURS[colour])
    else:
        draw.polygon([(x, y + extent), (x + extent, y + extent), (x + extent // 2, y)], fill=COLOURS[colour])
    return image


def write_shapes_manifest(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` coloured-shape PNGs and a JSONL manifest captioning each ("a red circle")."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        draw_shape(colour, shape, rng).save(folder / "images" / f"{index}.png")
        rows.append({"image": f"images/{index}.png", "text": f"a {colour} {shape}", "image_id": index})
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return manifest


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory) -> Path:
    return write_shapes_manifest(tmp_path_factory.mktemp("shapes"), 48)


def _saved_preset(tmp_path_factory, name: str) -> Path:
    from training.assemble import preset

    folder = tmp_path_factory.mktemp(name)
    preset(name).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """A folder with `stage1/` and `generation/` of the tiny-opt preset."""
    return _saved_preset(tmp_path_factory, "tiny-opt")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return _saved_preset(tmp_path_factory, "tiny-t5")
