"""Prompts and the paper's task defaults, in one place for training (fine-tuning, evaluation, the recipes) and
the server (its routes' defaults and its per-family prompts).

The generation defaults are the paper's zero-shot settings: captions with beam 5, 8-30 new tokens; VQA with
beam 5, at most 10 new tokens and length penalty -1 (short answers). `/generate` defaults to plain greedy
decoding. Training's `eval` takes the beam width from `--num-beams`, whose default is the same.
"""

from __future__ import annotations

CAPTION_PREFIX = "a photo of"  # what training puts before a caption target (never a target itself)
INSTRUCT_CAPTION_PROMPT = "A short image description:"  # InstructBLIP's caption instruction
VQA_TEMPLATE_DECODER = "Question: {} Answer:"  # decoder LLMs (OPT), per the paper
VQA_TEMPLATE_SHORT = "Question: {} Short answer:"  # Flan-T5 and InstructBLIP

# Per training task, what goes before the target: a caption's prefix, or a VQA template with {} for the question.
DEFAULT_PROMPTS = {"caption": CAPTION_PREFIX, "vqa": VQA_TEMPLATE_SHORT, "retrieval": ""}

PAPER_NUM_BEAMS = 5
# The generation settings a route (or `eval`) takes unless told otherwise, in the order `eval` reports them.
CAPTION_DEFAULTS = {
    "max_new_tokens": 30,
    "min_new_tokens": 8,
    "length_penalty": 1.0,
    "num_beams": PAPER_NUM_BEAMS,
}
VQA_DEFAULTS = {
    "max_new_tokens": 10,
    "min_new_tokens": 0,
    "length_penalty": -1.0,
    "num_beams": PAPER_NUM_BEAMS,
}
GENERATE_DEFAULTS = {"max_new_tokens": 30, "min_new_tokens": 0, "length_penalty": 1.0, "num_beams": 1}
GENERATION_DEFAULTS = {"caption": CAPTION_DEFAULTS, "vqa": VQA_DEFAULTS, "generate": GENERATE_DEFAULTS}
# The settings a task default fixes (a model folder's generation_config.json may override each).
TASK_GENERATION_OPTIONS = tuple(GENERATE_DEFAULTS)


def resolve_prompt(task: str, prompt: str | None) -> str:
    """The given prompt, or the task's default when none is given (an empty prompt is a prompt)."""
    return DEFAULT_PROMPTS[task] if prompt is None else prompt
