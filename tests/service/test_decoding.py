"""The serving decode loop (service/engine/decoding.py) gives the tokens transformers' `generate()` gives, for the
same settings, on the CPU in fp32 (and with bitsandbytes' 8-bit LLM): greedy, sampling, beam search with
length penalty, min_new_tokens, repetition penalty, max_new_tokens, EOS; batches with prompts of different
lengths (left padding); streaming. Each case runs the same jobs through a Runner with `decoder="fast"` and
one with `decoder="transformers"` over the same loaded models."""

from __future__ import annotations

import pytest
import torch
from servertools import settings_for

from service.engine.inference import Runner
from service.engine.jobs import GenerateJob, GenerationOptions
from service.engine.loading import load_models
from service.settings import DEFAULT_MODEL_DIR

OPTIONS = {
    "greedy": GenerationOptions(max_new_tokens=12),
    "beam5": GenerationOptions(max_new_tokens=12, num_beams=5),
    "beam5-short-answers": GenerationOptions(max_new_tokens=10, num_beams=5, length_penalty=-1.0),
    "beam3-min-tokens-repetition": GenerationOptions(
        max_new_tokens=9, min_new_tokens=4, num_beams=3, repetition_penalty=1.3, length_penalty=0.5
    ),
    "greedy-repetition-min-tokens": GenerationOptions(
        max_new_tokens=9, min_new_tokens=3, repetition_penalty=1.2
    ),
}
PROMPTS = ["", "a photo of", "Question: what is in the picture on the left? Answer:", "the"]


def both(models) -> tuple[Runner, Runner]:
    fast, slow = Runner(models, decoder="fast"), Runner(models, decoder="transformers")
    assert fast.fast_decoder is not None and slow.fast_decoder is None
    return fast, slow


def answers(runner: Runner, jobs: list[GenerateJob]) -> list[tuple[str, int, str]]:
    return [(g.text, g.tokens, g.finish_reason) for g in runner(jobs)]


@pytest.fixture(scope="module")
def tiny_runners(checkpoints):
    return both(load_models(settings_for(checkpoints["tiny-opt"] / "generation")))


@pytest.mark.parametrize("name", OPTIONS)
def test_tiny_opt_tokens_equal_generate(tiny_runners, photos, name):
    """Random weights: answers run to max_new_tokens or stop anywhere, in a batch of four prompt lengths."""
    fast, slow = tiny_runners
    jobs = [
        GenerateJob(photo, prompt, OPTIONS[name]) for photo, prompt in zip(photos, PROMPTS * 2, strict=True)
    ]
    assert answers(fast, jobs) == answers(slow, jobs)


@pytest.mark.parametrize("name", OPTIONS)
def test_fixed_shape_steps_tokens_equal_generate(tiny_runners, photos, name):
    """`--cuda-graphs` steps (rows padded to a power of two, attention over the whole rounded-up capacity
    under a mask, writes at a tensor index), run eagerly on the CPU: the tokens are still generate()'s, for
    every setting, with padding rows beside the batch's (8 prompts: 40 beam rows in 64)."""
    fixed, slow = Runner(tiny_runners[0].models, decoder="fast", cuda_graphs=True), tiny_runners[1]
    assert fixed.fast_decoder.fixed_shapes
    jobs = [
        GenerateJob(photo, prompt, OPTIONS[name]) for photo, prompt in zip(photos, PROMPTS * 2, strict=True)
    ]
    assert answers(fixed, jobs) == answers(slow, jobs)
    assert answers(fixed, jobs[:3]) == answers(slow, jobs[:3])  # another shape after the first, same buffers


class RecordingStep:
    """The decoder's own step, called as before, with the attention mask of every call kept."""

    def __init__(self, step) -> None:
        self.step, self.masks = step, []

    def __call__(self, tokens, positions, cache, mask, write_at=None):
        self.masks.append(mask)
        return self.step(tokens, positions, cache, mask, write_at)


def test_unpadded_batches_step_without_a_mask(tiny_runners, photos):
    """generate() passes no attention mask when no prompt is padded (every /caption batch): on a GPU a mask
    selects another SDPA kernel, so the steps pass none either; with left padding they pass it."""
    runner, slow = Runner(tiny_runners[0].models, decoder="fast"), tiny_runners[1]
    runner.fast_decoder.step = recording = RecordingStep(runner.fast_decoder.step)
    for name in ("greedy", "beam5"):
        same_prompt = [GenerateJob(photo, "a photo of", OPTIONS[name]) for photo in photos[:4]]
        assert answers(runner, same_prompt) == answers(slow, same_prompt)
        assert recording.masks and all(mask is None for mask in recording.masks)
        recording.masks.clear()
        padded = [
            GenerateJob(photo, prompt, OPTIONS[name]) for photo, prompt in zip(photos, PROMPTS, strict=False)
        ]
        assert answers(runner, padded) == answers(slow, padded)
        assert recording.masks and all(mask is not None for mask in recording.masks)
        recording.masks.clear()


def test_kv_cache_arena_keeps_no_more_than_its_cap(tiny_runners, photos):
    """The arena keeps a small batch's cache; a batch over the cap gets its own, and the kept one stays
    (it no longer grows to the largest batch ever seen). A cap of 0 keeps nothing."""
    models, slow = tiny_runners[0].models, tiny_runners[1]
    runner = Runner(models, decoder="fast")
    jobs = [
        GenerateJob(photo, prompt, OPTIONS["beam5"])
        for photo, prompt in zip(photos, PROMPTS * 2, strict=True)
    ]
    assert answers(runner, jobs[:1]) == answers(slow, jobs[:1])
    arena = runner.fast_decoder.arena
    kept = arena.memory
    arena.max_bytes = kept.numel() * kept.element_size()
    assert answers(runner, jobs) == answers(slow, jobs)  # 40 beam rows: over the cap
    assert arena.memory is kept
    nothing_kept = Runner(models, decoder="fast", kv_cache_max_mb=0)
    assert answers(nothing_kept, jobs) == answers(slow, jobs)
    assert nothing_kept.fast_decoder.arena.memory is None


def test_fixed_shape_padding_rows_start_alike_in_every_batch(tiny_runners, photos):
    """`--cuda-graphs`: a batch of 3 pads to the 4 rows of the batch before it; its padding row must not keep
    that batch's token and position (with per-tensor activation scaling they would reach its answers)."""
    fixed, slow = Runner(tiny_runners[0].models, decoder="fast", cuda_graphs=True), tiny_runners[1]
    jobs = [
        GenerateJob(photo, prompt, OPTIONS["greedy"]) for photo, prompt in zip(photos, PROMPTS, strict=False)
    ]
    assert answers(fixed, jobs) == answers(slow, jobs)
    (buffers,) = fixed.fast_decoder.graphs.values()
    assert buffers.positions[3].item() > 0  # the fourth row decoded
    assert answers(fixed, jobs[:3]) == answers(slow, jobs[:3])
    assert list(fixed.fast_decoder.graphs.values()) == [buffers]  # the same shape, the same buffers
    assert buffers.tokens[3].item() == 0 and buffers.positions[3].item() == 0


def test_sampling_draws_the_same_tokens_from_the_same_seed(tiny_runners, photos):
    fast, slow = tiny_runners
    options = GenerationOptions(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9)
    jobs = [GenerateJob(photo, prompt, options) for photo, prompt in zip(photos[:4], PROMPTS, strict=True)]
    torch.manual_seed(11)
    drawn = answers(fast, jobs)
    torch.manual_seed(11)
    assert drawn == answers(slow, jobs)


def test_streamed_tokens_are_the_answer(tiny_runners, photos):
    fast, slow = tiny_runners
    options = GenerationOptions(max_new_tokens=8)
    streams = {"fast": [[] for _ in range(3)], "transformers": [[] for _ in range(3)]}
    for name, runner in (("fast", fast), ("transformers", slow)):
        jobs = [
            GenerateJob(photo, prompt, options, on_token=streams[name][n].append)
            for n, (photo, prompt) in enumerate(zip(photos[:3], PROMPTS, strict=False))
        ]
        runner(jobs)
    assert streams["fast"] == streams["transformers"] and any(streams["fast"])


def test_eight_bit_llm_tokens_equal_generate(checkpoints, photos):
    """bitsandbytes LLM.int8 on the CPU: the loop calls the model's own 8-bit linear layers. Its steps are
    never captured in CUDA graphs (a host sync in every layer)."""
    models = load_models(settings_for(checkpoints["tiny-opt"] / "generation", load_in_8bit=True))
    assert not Runner(models, decoder="fast", cuda_graphs=True).fast_decoder.fixed_shapes
    fast, slow = both(models)
    for options in (OPTIONS["greedy"], OPTIONS["beam5"]):
        jobs = [
            GenerateJob(photo, prompt, options) for photo, prompt in zip(photos[:4], PROMPTS, strict=True)
        ]
        assert answers(fast, jobs) == answers(slow, jobs)


def test_torchao_int8_llm_tokens_equal_generate(checkpoints, photos):
    """torchao int8 weight-only: the loop runs the model's quantised linears as generate() does, also at
    fixed shapes (torchao's layers, unlike bitsandbytes', can be captured in CUDA graphs)."""
    models = load_models(settings_for(checkpoints["tiny-opt"] / "generation", quantization="torchao-int8"))
    fast, slow = both(models)
    fixed = Runner(models, decoder="fast", cuda_graphs=True)
    assert fixed.fast_decoder.fixed_shapes
    jobs = [
        GenerateJob(photo, prompt, OPTIONS["beam5"])
        for photo, prompt in zip(photos[:4], PROMPTS, strict=True)
    ]
    assert answers(fast, jobs) == answers(slow, jobs) == answers(fixed, jobs)


def test_other_llm_families_and_settings_use_generate(checkpoints, tmp_path):
    """Flan-T5 has no fast path: generate() serves it. An OPT whose generation_config asks for a step the
    loop does not have (here no_repeat_ngram_size) is served by generate() too."""
    t5 = load_models(settings_for(checkpoints["tiny-t5"] / "generation"))
    assert Runner(t5, decoder="fast").fast_decoder is None
    models = load_models(settings_for(checkpoints["tiny-opt"] / "generation"))
    models.generation.model.language_model.generation_config.no_repeat_ngram_size = 3
    assert Runner(models, decoder="fast").fast_decoder is None
    assert (
        Runner(load_models(settings_for(checkpoints["instructblip"])), decoder="fast").fast_decoder
        is not None
    )


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "generation").is_dir(), reason="no packaged default model")
def test_default_model_1000_questions_and_200_captions_equal_generate():
    """The built-in model (InstructBLIP, OPT LLM): 1,000 easy-VQA test questions and 200 captions, greedy and
    beam 5 with the routes' settings, in batches of 16; also with the fixed-shape (`--cuda-graphs`) steps."""
    import easy_vqa
    from PIL import Image

    from blip2.prompts import CAPTION_DEFAULTS, INSTRUCT_CAPTION_PROMPT, VQA_DEFAULTS, VQA_TEMPLATE_SHORT

    models = load_models(settings_for(DEFAULT_MODEL_DIR / "generation"))
    fast, slow = both(models)
    fixed = Runner(models, decoder="fast", cuda_graphs=True)
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    folder = models.generation.generation_defaults
    vqa = [(image_ids[n], VQA_TEMPLATE_SHORT.replace("{}", questions[n])) for n in range(1000)]
    captions = [(n, INSTRUCT_CAPTION_PROMPT) for n in range(200)]
    for work, defaults in ((vqa, VQA_DEFAULTS), (captions, CAPTION_DEFAULTS)):
        for beams in (1, 5):
            options = GenerationOptions(**(defaults | folder | {"num_beams": beams}))
            for start in range(0, len(work), 16):
                jobs = [
                    GenerateJob(Image.open(paths[image]).convert("RGB"), prompt, options)
                    for image, prompt in work[start : start + 16]
                ]
                expected = answers(slow, jobs)
                assert answers(fast, jobs) == expected, (options, start)
                assert answers(fixed, jobs) == expected, ("fixed shapes", options, start)
