"""Prompts and generation defaults per task and model family: the paper's, kept in the service's own copy
(the service never imports training; a test holds this copy equal to training's)."""

from __future__ import annotations

from service.loading import GenerationModel
from service.settings import Settings

# The paper's settings: captions with beam 5, 8-30 tokens; VQA with beam 5, at most 10 tokens, length
# penalty -1 (short answers). /generate defaults to plain greedy decoding.
CAPTION_DEFAULTS = {"max_new_tokens": 30, "min_new_tokens": 8, "num_beams": 5, "length_penalty": 1.0}
VQA_DEFAULTS = {"max_new_tokens": 10, "min_new_tokens": 0, "num_beams": 5, "length_penalty": -1.0}
GENERATE_DEFAULTS = {"max_new_tokens": 30, "min_new_tokens": 0, "num_beams": 1, "length_penalty": 1.0}
INSTRUCT_CAPTION_PROMPT = "A short image description:"
VQA_TEMPLATE_DECODER = "Question: {} Answer:"  # OPT, per the paper
VQA_TEMPLATE_SHORT = "Question: {} Short answer:"  # Flan-T5 and InstructBLIP


def family_prompt(gen: GenerationModel, settings: Settings) -> tuple[str, str]:
    """Default (caption prompt, VQA template) for the loaded model family; the settings may override both."""
    instruct = gen.kind == "instructblip"
    caption = (
        settings.caption_prompt
        if settings.caption_prompt is not None
        else (INSTRUCT_CAPTION_PROMPT if instruct else "")
    )
    if settings.vqa_prompt_template is not None:
        return caption, settings.vqa_prompt_template
    decoder = not gen.is_encoder_decoder and not instruct
    return caption, VQA_TEMPLATE_DECODER if decoder else VQA_TEMPLATE_SHORT
