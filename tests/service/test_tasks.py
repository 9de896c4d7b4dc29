"""The generation routes' task profiles, built once from the loaded model (service/engine/tasks.py): the family's
prompts by name, the paper's defaults under the model folder's own, the server's bounds refused as the engine's
InvalidInput (the API answers it 422; tests/service/test_routes.py checks the routes' answers)."""

from __future__ import annotations

import pytest
from servertools import settings_for

from blip2.prompts import (
    CAPTION_DEFAULTS,
    GENERATE_DEFAULTS,
    INSTRUCT_CAPTION_PROMPT,
    VQA_DEFAULTS,
    VQA_TEMPLATE_SHORT,
)
from service.api.schemas import CaptionRequest, GenerateRequest, VqaRequest
from service.engine.batching import InvalidInput
from service.engine.loading import load_models
from service.engine.prompts import Prompt
from service.engine.tasks import task_profiles
from service.settings import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "generation").is_dir(), reason="no packaged default model"
)


@pytest.fixture(scope="module")
def generation():
    return load_models(settings_for(DEFAULT_MODEL_DIR / "generation")).generation


def test_profiles_hold_the_familys_prompts_and_the_models_defaults(generation):
    tasks = task_profiles(generation, settings_for(None))
    assert generation.kind == "instructblip"
    assert (tasks.caption.prompt, tasks.vqa.template) == (INSTRUCT_CAPTION_PROMPT, VQA_TEMPLATE_SHORT)
    assert generation.generation_defaults == {"min_new_tokens": 1}  # the folder's generation_config.json
    assert tasks.caption.defaults == CAPTION_DEFAULTS | {"min_new_tokens": 1}
    assert tasks.vqa.defaults == VQA_DEFAULTS | {"min_new_tokens": 1}
    assert tasks.generate.defaults == GENERATE_DEFAULTS | {"min_new_tokens": 1}
    chosen = task_profiles(
        generation, settings_for(None, caption_prompt="a picture of", vqa_prompt_template="Q: {} A:")
    )
    assert (chosen.caption.prompt, chosen.vqa.template) == ("a picture of", "Q: {} A:")


def test_a_task_is_its_prompt_and_options(generation):
    tasks = task_profiles(generation, settings_for(None))
    default = tasks.caption.task(CaptionRequest(), None)
    assert (
        default.prompt == INSTRUCT_CAPTION_PROMPT
        and default.options.num_beams == CAPTION_DEFAULTS["num_beams"]
    )
    assert tasks.caption.task(CaptionRequest(), "a dog").prompt == Prompt.person("a dog")
    vqa = tasks.vqa.task(VqaRequest(question="what?", max_new_tokens=3), "what?", None)
    assert vqa.prompt == Prompt.question(VQA_TEMPLATE_SHORT, "what?")
    assert (vqa.options.max_new_tokens, vqa.options.length_penalty) == (3, VQA_DEFAULTS["length_penalty"])
    generate = tasks.generate.task(GenerateRequest(prompt="hi", max_new_tokens=2, min_new_tokens=5), "hi")
    assert (generate.options.max_new_tokens, generate.options.min_new_tokens) == (2, 2)  # the maximum wins


def test_a_task_out_of_bounds_is_invalid_input(generation):
    tasks = task_profiles(generation, settings_for(None, max_prompt_chars=10, max_new_tokens_limit=20))
    with pytest.raises(InvalidInput, match="max_new_tokens: at most 20"):
        tasks.caption.task(CaptionRequest(max_new_tokens=21), None)
    with pytest.raises(InvalidInput, match="prompt: at most 10 characters"):
        tasks.generate.task(GenerateRequest(prompt="x" * 11, max_new_tokens=5), "x" * 11)
    with pytest.raises(InvalidInput, match="exactly one `{}`"):
        tasks.vqa.task(VqaRequest(question="q"), "q", "Q: {} {}")
