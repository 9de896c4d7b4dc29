"""ViT outputs, computed once per distinct image.

Within a batch, identical images run through the ViT once. Across batches, a small LRU cache keyed by
(tower, preprocessed pixels) keeps recent outputs: when the generation and retrieval models share one
vision tower (loading.share_vision_tower), an image that is captioned and then embedded or retrieved
goes through the ViT once and feeds both models. Keys are the preprocessed pixels, so two models that
preprocess differently (224 vs 364 px) never share an entry by mistake.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from service.engine.loading import LoadedModels


def to_device(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A host tensor on `device` (cast there to `dtype`). To a CUDA device the copy goes from pinned memory,
    asynchronously (a pageable copy is staged through a pinned buffer and blocks the host until done)."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype)


class VisionCache:
    """Used from the model thread only (no locking needed)."""

    def __init__(self, capacity: int, on_images: Callable[[int, int], None] | None = None) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, bytes], torch.Tensor] = OrderedDict()
        self._on_images = on_images or (lambda computed, reused: None)

    def states(
        self, tower: torch.nn.Module, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """`tower(pixels).last_hidden_state`, running only the rows not seen before."""
        keys = [
            (id(tower), hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest())
            for row in pixels.cpu()
        ]
        found: dict[tuple[int, bytes], torch.Tensor] = {}
        todo: dict[tuple[int, bytes], int] = {}
        for row, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                found[key] = self._entries[key]
            elif key not in todo:
                todo[key] = row
        if todo:
            batch = to_device(pixels[list(todo.values())], device, dtype)
            computed = tower(pixel_values=batch).last_hidden_state
            for key, value in zip(todo, computed, strict=True):
                found[key] = value
                self._remember(key, value)
        self._on_images(len(todo), len(keys) - len(todo))
        return torch.stack([found[key] for key in keys])

    def _remember(self, key: tuple[int, bytes], value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        # A copy: a row of the batch's output would keep the whole batch's ViT output alive (on the GPU,
        # 257 x 1408 x 2 bytes per image of EVA ViT-g, for as long as any one of its rows stays cached).
        self._entries[key] = value.clone()
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class ModelsOnDevice:
    """What the runner's generation and retrieval share: the loaded models, their device and dtype, and the
    cache of ViT states (one tower may serve both)."""

    def __init__(self, models: LoadedModels, vision_cache: VisionCache | None = None) -> None:
        self.models = models
        self.vision = vision_cache or VisionCache(0)

    def vision_states(self, tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """`tower`'s outputs for host pixels, on the models' device and in their dtype, once per distinct image."""
        return self.vision.states(tower, pixels, self.models.device, self.models.dtype)
