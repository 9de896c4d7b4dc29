"""Prompts and the paper's generation defaults, in one place for fine-tuning, evaluation and the recipes.

The server keeps its own copy of the ones it needs (`service/prompts.py`: the service never imports
training); tests/training/test_prompts.py holds the two copies equal.
"""

from __future__ import annotations

# What goes before the target: a caption's prefix, or a VQA template with {} for the question.
DEFAULT_PROMPTS = {"caption": "a photo of", "vqa": "Question: {} Short answer:", "retrieval": ""}
# InstructBLIP's caption instruction, the server's default caption prompt for InstructBLIP models.
INSTRUCT_CAPTION_PROMPT = "A short image description:"

# The paper's settings (with beam search, `eval --num-beams`, 5 by default): zero-shot VQA and captioning.
GENERATION_DEFAULTS = {
    "vqa": {"max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": -1.0},
    "caption": {"max_new_tokens": 30, "min_new_tokens": 8, "length_penalty": 1.0},
}


def resolve_prompt(task: str, prompt: str | None) -> str:
    """The given prompt, or the task's default when none is given (an empty prompt is a prompt)."""
    return DEFAULT_PROMPTS[task] if prompt is None else prompt
