"""One collated micro-batch: what the collators (`training.data.Collator`, `training.finetune.PromptCollator`)
write and the tasks (`training.stages`) and the loop (`training.trainer`) read. A field a batch does not
carry is None: the stage-2 collator tokenises no text, only VQA batches have per-sample prompts, only
InstructBLIP batches have Q-Former prompt tokens, and a batch has pixels or cached ViT features."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    size: int  # samples kept
    skipped: int  # samples dropped: an unreadable image, or a text no tokenizer can take
    # Per sample: its text (a caption after the text processing; with per-sample prompts, the prompt joined
    # with its target) and its manifest row.
    texts: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    image_ids: torch.Tensor | None = None  # (B,) captions of one image share an id (ITC positives)
    caption_ids: torch.Tensor | None = None  # (B,) equal texts share an id (--same-caption-positives)
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W)
    vision_hidden: torch.Tensor | None = None  # (B, N, D): cached by `blip2-train data cache-features`
    input_ids: torch.Tensor | None = None  # (B, T): the texts in the Q-Former's tokens (stage 1, retrieval)
    attention_mask: torch.Tensor | None = None
    prompts: list[str] | None = None  # per-sample prompts (VQA), already joined to `texts`
    qformer_input_ids: torch.Tensor | None = None  # the prompts in the Q-Former's tokens (InstructBLIP)
    qformer_attention_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch with its tensors on `device` (copied without blocking where the source allows)."""
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)
