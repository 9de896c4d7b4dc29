"""Synthetic coloured shapes on white, each captioned ("a red circle"): a small real image-caption set made
in seconds, for the smoke runs and the tests.

`python -m recipes.shapes OUT [COUNT]` writes OUT/images/*.png and the manifest OUT/train.jsonl.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

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


if __name__ == "__main__":
    print(write_shapes_manifest(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 256))
