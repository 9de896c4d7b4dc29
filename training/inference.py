"""Running saved checkpoints outside the training loop, for evaluation and CapFilt: the device, images read
with blanks in place of unreadable ones, progress bars, and batched generation through the checkpoint's own
processor and `generate()`, as a user of plain transformers would run it (BLIP-2 or InstructBLIP alike).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import torch
from PIL import Image
from tqdm import tqdm

from training.data import IMAGE_ERRORS, load_image

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def progress_bar(iterable: Iterable, progress: bool, desc: str) -> Iterable:
    return tqdm(iterable, desc=desc, disable=not progress, file=sys.stderr)


def images_or_blanks(paths: list[str]) -> tuple[list[Image.Image], list[bool]]:
    """The images, a blank one for each that cannot be read (it stays in the batch, so every figure counts
    the same rows), and which were read."""
    images, ok = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            ok.append(True)
        except IMAGE_ERRORS as error:
            log.warning("unreadable image %s: %s", path, error)
            images.append(Image.new("RGB", (32, 32)))
            ok.append(False)
    return images, ok


def load_generation_model(folder: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    """A BLIP-2 or InstructBLIP generation folder in fp32, in eval mode, and its processor."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        InstructBlipForConditionalGeneration,
    )

    kind = AutoConfig.from_pretrained(folder).model_type
    model_class = (
        InstructBlipForConditionalGeneration if kind == "instructblip" else Blip2ForConditionalGeneration
    )
    model = model_class.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return model, AutoProcessor.from_pretrained(folder)


@torch.no_grad()
def generate_texts(
    model, processor, paths: list[str], prompts: list[str], batch_size: int, progress: bool, **generate_kwargs
) -> list[str]:
    """Batched generation; returns only the generated continuation of each prompt (with
    `num_return_sequences=n`, n consecutive texts per image)."""
    device = next(model.parameters()).device
    decoder_only = model.config.use_decoder_only_language_model
    per_image = generate_kwargs.get("num_return_sequences", 1)
    outputs: list[str] = []
    for start in progress_bar(range(0, len(paths), batch_size), progress, f"generate ({len(paths)} images)"):
        images, ok = images_or_blanks(paths[start : start + batch_size])
        batch_prompts = prompts[start : start + batch_size]
        if any(batch_prompts):
            inputs = processor(images=images, text=batch_prompts, padding=True, return_tensors="pt")
            prefix = inputs["input_ids"].shape[1]
            if hasattr(processor, "qformer_tokenizer"):
                # InstructBlipProcessor pads the Q-Former's text on the LLM tokenizer's (left) side; the
                # Q-Former was trained right-padded and BERT's positions are absolute.
                qformer = processor.qformer_tokenizer(
                    batch_prompts, padding=True, padding_side="right", return_tensors="pt"
                )
                inputs["qformer_input_ids"] = qformer["input_ids"]
                inputs["qformer_attention_mask"] = qformer["attention_mask"]
        else:  # no prompt: generate() starts from the query tokens and bos
            inputs = processor(images=images, return_tensors="pt")
            prefix = model.config.num_query_tokens + 1
        inputs = {k: v.to(device) for k, v in inputs.items()}
        generated = model.generate(**inputs, **generate_kwargs)
        if decoder_only:
            generated = generated[:, prefix:]
        texts = processor.batch_decode(generated, skip_special_tokens=True)
        good = [flag for flag in ok for _ in range(per_image)]
        outputs += [t.strip() if g else "" for t, g in zip(texts, good, strict=True)]
    return outputs
