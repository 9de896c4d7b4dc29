"""The service keeps its own copy of the prompts and the paper's generation defaults (it never imports
training); the two copies must say the same thing."""

from __future__ import annotations

from service import prompts as served
from training.prompts import DEFAULT_PROMPTS, GENERATION_DEFAULTS, INSTRUCT_CAPTION_PROMPT
from training.settings import EvalSettings


def test_the_paper_generation_defaults_are_the_servers():
    # Training leaves the beam width to `eval --num-beams` (the paper's 5 by default).
    beams = {"num_beams": EvalSettings().num_beams}
    assert GENERATION_DEFAULTS["caption"] | beams == served.CAPTION_DEFAULTS
    assert GENERATION_DEFAULTS["vqa"] | beams == served.VQA_DEFAULTS


def test_the_prompts_are_the_servers():
    assert DEFAULT_PROMPTS["vqa"] == served.VQA_TEMPLATE_SHORT  # Flan-T5's and InstructBLIP's template
    assert INSTRUCT_CAPTION_PROMPT == served.INSTRUCT_CAPTION_PROMPT
