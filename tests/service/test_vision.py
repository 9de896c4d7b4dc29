"""service.engine.vision: the ViT-output cache and the host-to-device copy."""

from __future__ import annotations

import torch
from servertools import settings_for

from service.engine.loading import load_models
from service.engine.vision import VisionCache, to_device


def test_cached_entries_own_their_memory(checkpoints):
    """An entry is a copy of its image's row: a view would keep the whole batch's ViT output alive."""
    models = load_models(settings_for(checkpoints["tiny-opt"] / "generation"))
    tower = models.generation.model.vision_model
    cache = VisionCache(8)
    pixels = torch.randn(3, 3, 64, 64)
    states = cache.states(tower, pixels, torch.device("cpu"), torch.float32)
    entries = list(cache._entries.values())
    assert len(entries) == 3
    for entry, row in zip(entries, states, strict=True):
        assert entry.untyped_storage().nbytes() == entry.numel() * entry.element_size()
        assert torch.equal(entry, row)


def test_to_device_casts_on_the_cpu():
    tensor = torch.arange(4)
    moved = to_device(tensor, torch.device("cpu"), torch.float32)
    assert moved.dtype == torch.float32 and torch.equal(moved, tensor.float())
