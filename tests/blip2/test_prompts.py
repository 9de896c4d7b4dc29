"""The prompts and task defaults that training (fine-tuning, `eval`) and the server (its routes) both take
from the core."""

from __future__ import annotations

import pytest

from blip2.prompts import CAPTION_DEFAULTS, DEFAULT_PROMPTS, VQA_DEFAULTS, resolve_prompt


@pytest.mark.parametrize("task", sorted(DEFAULT_PROMPTS))
def test_a_missing_prompt_is_the_tasks_default_and_an_empty_one_is_kept(task):
    assert resolve_prompt(task, None) == DEFAULT_PROMPTS[task]
    assert resolve_prompt(task, "") == ""
    assert resolve_prompt(task, "Q: {} A:") == "Q: {} A:"


def test_an_unknown_task_is_refused():
    with pytest.raises(KeyError):
        resolve_prompt("detection", None)


def test_the_paper_settings():
    """BLIP-2's zero-shot generation: beam 5 for both tasks, short VQA answers, 8-30 token captions."""
    assert VQA_DEFAULTS == {"max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": -1.0, "num_beams": 5}
    assert CAPTION_DEFAULTS == {
        "max_new_tokens": 30,
        "min_new_tokens": 8,
        "length_penalty": 1.0,
        "num_beams": 5,
    }
    assert DEFAULT_PROMPTS["vqa"].format("what colour?") == "Question: what colour? Short answer:"
