"""The serving path's defaults on a GPU: the fast decoder against transformers' `generate()` in fp16 and with
bitsandbytes' 8-bit LLM, greedy and beam 5, batches without and with left padding, on the tiny-opt preset and
the built-in model; the server's start-up with the GPU image's settings; out-of-memory halving.

On a GPU the two decoders run different kernels for the same sums (generate() prefills every beam, the fast
decoder each image once; a GEMM of another height may tile its sums otherwise), so near-ties can flip a token.
The tests report the share of equal answers and every difference ($GPU_REPORT_DIR), and require nearly all."""

from __future__ import annotations

import logging

import pytest
import torch

from blip2.prompts import INSTRUCT_CAPTION_PROMPT, VQA_TEMPLATE_SHORT
from service.engine.inference import Runner
from service.engine.jobs import GenerateJob, GenerationOptions
from service.engine.loading import load_models
from service.engine.vision import VisionCache
from service.settings import DEFAULT_MODEL_DIR, Settings

from .conftest import DEVICE

OPTIONS = {
    "greedy": GenerationOptions(max_new_tokens=20),
    "beam5": GenerationOptions(max_new_tokens=20, num_beams=5),
}
LLM = {"fp16": {"quantization": "none"}, "bnb-int8": {"quantization": "bnb-int8"}}
# Prompts of different lengths: the batch is left-padded, and the steps attend under a mask.
PADDED_PROMPTS = ["", "a photo of", "Question: what is in the picture on the left? Answer:", "the"]
QUESTIONS = ["What shape is in the image?", "What color is the square?", "Is there a square?", "What is it?"]
BUILT_IN = DEFAULT_MODEL_DIR / "generation"
SHARE_REQUIRED = 0.9


def gpu_settings(folder, **overrides) -> Settings:
    dtype = "float16" if DEVICE == "cuda" else "float32"
    return Settings(**({"model": str(folder), "device": DEVICE, "dtype": dtype} | overrides))


def answers(runner: Runner, jobs: list[GenerateJob]) -> list[str]:
    return [g.text for g in runner(jobs)]


def prompts_of(model: str) -> dict[str, list[str]]:
    """Per batch kind, the prompts of its 16 jobs (cycled)."""
    if model == "tiny-opt":
        return {"unpadded": ["a photo of"], "padded": PADDED_PROMPTS}
    questions = [VQA_TEMPLATE_SHORT.replace("{}", q) for q in QUESTIONS]
    return {"unpadded": [INSTRUCT_CAPTION_PROMPT], "padded": [INSTRUCT_CAPTION_PROMPT, *questions]}


@pytest.mark.parametrize("llm", list(LLM))
@pytest.mark.parametrize("model", ["tiny-opt", "built-in"])
def test_fast_decoder_answers_equal_generate(model, llm, tiny_opt_generation, images, report):
    if model == "built-in" and not BUILT_IN.is_dir():
        pytest.skip("no packaged default model")
    folder = tiny_opt_generation if model == "tiny-opt" else BUILT_IN
    models = load_models(gpu_settings(folder, **LLM[llm]))
    fast, slow = Runner(models, decoder="fast"), Runner(models, decoder="transformers")
    assert fast.fast_decoder is not None
    equal = total = 0
    for batch, prompts in prompts_of(model).items():
        for name, options in OPTIONS.items():
            jobs = [GenerateJob(image, prompts[n % len(prompts)], options) for n, image in enumerate(images)]
            got, expected = answers(fast, jobs), answers(slow, jobs)
            same = sum(a == b for a, b in zip(got, expected, strict=True))
            report[f"{batch}/{name}"] = {
                "equal": same,
                "of": len(jobs),
                "differences": [
                    {
                        "prompt": job.prompt if isinstance(job.prompt, str) else str(job.prompt),
                        "fast": a,
                        "generate": b,
                    }
                    for job, a, b in zip(jobs, got, expected, strict=True)
                    if a != b
                ],
            }
            equal, total = equal + same, total + len(jobs)
    report["share_equal"] = equal / total
    report["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    assert equal / total >= SHARE_REQUIRED, report


def test_server_starts_with_the_gpu_defaults(images, report):
    """What the server's start-up does (service.api.app's lifespan, less the HTTP layer the bare machine lacks):
    the built-in models loaded with the GPU image's settings (CUDA, fp16, the LLM in 8-bit by default), the
    runner built from the settings, the warm-up request, then a caption equal to generate()'s."""
    if not BUILT_IN.is_dir():
        pytest.skip("no packaged default model")
    from bitsandbytes.nn import Linear8bitLt

    settings = Settings()  # the packaged models, device and 8-bit from what the machine has
    models = load_models(settings)
    llm = models.generation.model.language_model
    eight_bit = any(isinstance(module, Linear8bitLt) for module in llm.modules())
    if DEVICE == "cuda":
        assert models.device.type == "cuda" and models.dtype == torch.float16 and eight_bit
    runner = Runner(
        models,
        VisionCache(settings.vision_cache_size),
        settings.decoder,
        settings.cuda_graphs,
        kv_cache_max_mb=settings.kv_cache_max_mb,
    )
    assert runner.fast_decoder is not None
    runner.warm_up()
    options = GenerationOptions(max_new_tokens=20, num_beams=5)
    jobs = [GenerateJob(image, INSTRUCT_CAPTION_PROMPT, options) for image in images[:4]]
    got = answers(runner, jobs)
    report["answers"] = got
    if DEVICE == "cuda":
        report["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
    assert all(got)
    assert got == answers(Runner(models, decoder="transformers"), jobs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graph_steps_equal_generate(tiny_opt_generation, images, dtype, report):
    """`--cuda-graphs`: each fixed-shape step is captured once per shape (not fallen back to eager steps)
    and replayed by the next batch of that shape; a smaller batch of the same padded shape follows a larger
    one (its padding rows start afresh). fp32: generate()'s tokens; fp16: nearly all (reported)."""
    models = load_models(gpu_settings(tiny_opt_generation, quantization="none", dtype=dtype))
    graphs, slow = Runner(models, decoder="fast", cuda_graphs=True), Runner(models, decoder="transformers")
    equal = total = 0
    for name, options in OPTIONS.items():
        jobs = [GenerateJob(image, PADDED_PROMPTS[n % 4], options) for n, image in enumerate(images)]
        captured = None
        for batch in (jobs, jobs, jobs[:13]):  # 16 and 13 prompts: the same padded rows
            got, expected = answers(graphs, batch), answers(slow, batch)
            now = {key: buffers.graph for key, buffers in graphs.fast_decoder.graphs.items()}
            if DEVICE == "cuda":  # the CPU check runs the same steps eagerly
                assert graphs.fast_decoder.fixed_shapes and now and None not in now.values()
                assert captured is None or now == captured  # replayed, not captured again
            captured = now
            same = sum(a == b for a, b in zip(got, expected, strict=True))
            report.setdefault(name, []).append({"equal": same, "of": len(batch)})
            equal, total = equal + same, total + len(batch)
            if dtype == "float32":
                assert got == expected, name
    report["share_equal"] = equal / total
    assert equal / total >= SHARE_REQUIRED, report


def test_out_of_memory_runs_the_batch_in_halves(tiny_opt_generation, images, caplog, report):
    """Under a memory limit a batch of 16 x beam 8 with 200 new tokens no longer fits: the runner frees its
    cache, empties the allocator's and runs halves, with the answers of the unlimited run. The limit is
    lowered step by step until a halving happens (where it lies depends on the GPU and the allocator)."""
    if DEVICE != "cuda":
        pytest.skip("a CUDA memory limit")
    models = load_models(gpu_settings(tiny_opt_generation, quantization="none", dtype="float32"))
    runner = Runner(models, decoder="fast")
    options = GenerationOptions(max_new_tokens=200, min_new_tokens=200, num_beams=8)
    jobs = [GenerateJob(image, "a photo of", options) for image in images]
    expected = answers(runner, jobs)
    total = torch.cuda.get_device_properties(0).total_memory
    halved_at = []
    try:
        for spare_mb in (512, 256, 128, 64, 32, 16, 8):
            runner.release_memory()
            base = torch.cuda.memory_reserved()
            torch.cuda.set_per_process_memory_fraction((base + spare_mb * 2**20) / total)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="service.inference"):
                results = runner(jobs)
            if any(isinstance(result, torch.cuda.OutOfMemoryError) for result in results):
                # one request alone no longer fits: it alone has the error; lower limits show nothing more
                report["single_request_out_of_memory_at_mb"] = spare_mb
                break
            got = [result.text for result in results]
            if any("out of GPU memory" in r.getMessage() for r in caplog.records):
                halved_at.append(spare_mb)
                assert got == expected, spare_mb
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    report["halved_at_spare_mb"] = halved_at
    assert halved_at, "no limit tried made the batch run out of memory"
