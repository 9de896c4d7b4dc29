"""`blip2-train data cache-features`: encode every image of a manifest once with the frozen ViT.

The ViT is frozen in every stage, so its output for an image never changes; repeated epochs can read
it from disk instead of recomputing it. Shards are safetensors files `features-NNNNN.safetensors`
holding `features` (images, tokens, width); `index.json` maps each image path to [shard, row]. What is
stored is the ViT blocks' output before its final LayerNorm, which trains. Training from cached
features uses each image as encoded here, so random crops and flips are not applied.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from training.assemble import load_vision_tower
from training.data import IMAGE_ERRORS, ImageTransform, load_image, read_manifest
from training.model import frozen_vision_features
from training.settings import CacheFeaturesSettings

log = logging.getLogger(__name__)


def cache_features(settings: CacheFeaturesSettings) -> dict:
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    tower = load_vision_tower(settings.model).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tower.to(device)
    dtype = {"float16": torch.float16, "float32": torch.float32}[settings.dtype]
    transform = ImageTransform(tower.config.image_size, train=False)
    images = sorted({row["image"] for row in read_manifest(settings.manifest)})

    index: dict[str, list] = {}
    pending: list[torch.Tensor] = []  # one (tokens, width) tensor per image, not yet in a shard
    pending_paths: list[str] = []
    skipped, shards_written = 0, 0

    def write_shard(count: int) -> None:
        nonlocal shards_written
        name = f"features-{shards_written:05d}.safetensors"
        save_file({"features": torch.stack(pending[:count]).contiguous()}, str(output / name))
        for row, path in enumerate(pending_paths[:count]):
            index[path] = [name, row]
        del pending[:count], pending_paths[:count]
        shards_written += 1

    for start in tqdm(range(0, len(images), settings.batch_size), desc="cache-features"):
        pixels, paths = [], []
        for path in images[start : start + settings.batch_size]:
            try:
                pixels.append(transform(load_image(path)))
                paths.append(path)
            except IMAGE_ERRORS as error:
                skipped += 1
                log.warning("skipping %s: %s", path, error)
        if not pixels:
            continue
        pending.extend(
            frozen_vision_features(tower, torch.stack(pixels).to(device)).to("cpu", dtype).unbind(0)
        )
        pending_paths.extend(paths)
        while len(pending) >= settings.shard_size:
            write_shard(settings.shard_size)
    if pending:
        write_shard(len(pending))
    (output / "index.json").write_text(json.dumps(index))
    summary = {"images": len(index), "skipped": skipped, "output": str(output)}
    print(json.dumps({"summary": summary}))
    return summary
