"""BLIP-2 OPT-2.7B at its exact shapes, random weights, through the server's loading code and request batcher.

The model has the shapes of Salesforce/blip2-opt-2.7b (EVA ViT-g: 1408 wide, 39 layers, patch 14, 224 px;
32 queries; a BERT-base Q-Former with cross-attention every 2 layers; OPT-2.7B: 2560 wide, 32 layers,
vocab 50272), built from configs with random weights on the GPU, saved as safetensors, then loaded with
`service.engine.loading.load_models` once per LLM precision (`--modes`: fp16, bitsandbytes LLM.int8 with outlier
threshold 6 and 0, torchao int8 weight-only, torchao FP8). Each mode first answers the same 16 images
greedily (10 tokens), to compare its tokens with fp16's ("agreement with fp16"). For each mode and each
decoder (`fast`: the server's decode loop; `fast-graphs`: the same with `--cuda-graphs`, each step a CUDA
graph replay, not for bitsandbytes LLMs, which cannot be captured; `transformers`: generate()), captions at
batch 1, 32 and 64 (beam 5) and at batch 64 greedily (`--greedy-batches`) go
through `service.engine.batching.Batcher` (B requests submitted at once form one batch): captions/s, the time per
decode step, peak GPU memory, the ViT's share of the batch time (CUDA-synchronised hooks around it), and
"% of bound": the captions/s that memory bandwidth and peak FLOPs allow (bench/roofline.py), on a known chip.
FP8 runs only on a GPU that has it (compute capability 8.9 and up); the others record why it was skipped.
bench/gpu_kit.py runs this as the kit's measurement step (`bash bench/gpu_session.sh`).

Captions use the paper's beam width 5 with a fixed length of 30 new tokens (min = max = 30): random
weights would otherwise stop at random lengths. Every request carries a different random image, so the
server's ViT cache never helps. For the first mode, one batch of 8 per decoder also runs under torch.profiler:
CUDA kernels per decode step and the share of the time the GPU is busy. Results go to `--out` (default $OUT or /tmp) as JSON after every cell, and
the run stops starting new cells after `--budget-s` seconds, so it ends inside a 5-minute slot.

    python bench/gpu_blip2_opt27b_shapes.py                 # on one H100 / H200
    python bench/gpu_blip2_opt27b_shapes.py --small         # tiny widths, same pipeline, runs on the CPU
    python bench/gpu_blip2_opt27b_shapes.py --decoders fast --modes fp16 --batches 32   # one cell
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from roofline import Roofline, chip_of  # noqa: E402

T0 = time.perf_counter()

# Salesforce/blip2-opt-2.7b config.json, fields that set shapes.
VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02)  # fmt: skip
QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               cross_attention_frequency=2, encoder_hidden_size=1408, vocab_size=30522, max_position_embeddings=512)  # fmt: skip
OPT = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
           word_embed_proj_dim=2560, max_position_embeddings=2048, do_layer_norm_before=True,
           bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.0, torch_dtype="float16")  # fmt: skip
SMALL = {
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "qformer": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=64),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
}  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def build(folder: Path, small: bool, device: torch.device) -> int:
    """Random model with the real shapes (or --small ones) + a processor, saved to `folder`. Returns params."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from training.assemble import image_processor
    from training.vocab import preset_llm_tokenizer

    tokenizer = preset_llm_tokenizer("opt")  # offline; ids fit in OPT's 50272 rows
    processor = Blip2Processor(image_processor(224), tokenizer, num_query_tokens=32)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    vision, qformer, opt = dict(VISION), dict(QFORMER), dict(OPT)
    if small:
        vision |= SMALL["vision"]
        qformer |= SMALL["qformer"]
        opt |= SMALL["opt"]
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=opt, num_query_tokens=32,
        image_token_index=image_token,
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    params = sum(p.numel() for p in model.parameters())
    log(f"built {params / 1e9:.3f} B parameters on {device}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"saved to {folder}")
    return params


class VitClock:
    """Forward hooks around the vision tower; with CUDA they synchronise so the times are the tower's own."""

    def __init__(self, tower: torch.nn.Module, cuda: bool) -> None:
        self.seconds, self.cuda, self._start = 0.0, cuda, 0.0
        tower.register_forward_pre_hook(self._pre)
        tower.register_forward_hook(self._post)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._start


def images(count: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(count)]


async def rounds(batcher, runner, options, batch: int, count: int, seed: int) -> tuple[float, float]:
    """`count` rounds of `batch` requests submitted together (one batch each): (seconds, mean new tokens).
    Images are preprocessed before the clock starts, as the server does at intake, beside the model thread."""
    from service.engine.jobs import GenerateJob

    prepared = []
    for n in range(count):
        prepared.append([GenerateJob(image, "", options) for image in images(batch, seed + n)])
        for job in prepared[-1]:
            runner.prepare(job)
    started, tokens = time.perf_counter(), []
    for jobs in prepared:
        results = await asyncio.gather(*(batcher.submit(job, 600) for job in jobs))
        tokens += [r.tokens for r in results]
    return time.perf_counter() - started, sum(tokens) / len(tokens)


def profile_batch(runner, options, batch: int, cuda: bool) -> dict:
    """One batch under torch.profiler (its overhead included): the CUDA kernels, or on the CPU the top-level
    operators, per decode step, and on a GPU the share of the wall time its kernels kept the device busy.
    Many launches per step with the device mostly idle is the overhead CUDA graphs remove."""
    from torch.profiler import ProfilerActivity, profile

    from service.engine.jobs import GenerateJob

    jobs = [GenerateJob(image, "", options) for image in images(batch, seed=99)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as trace:
        started = time.perf_counter()
        runner(jobs)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = trace.events()
    cell = {"batch": batch, "wall_s": round(wall, 4)}
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        cell["kernels_per_decode_step"] = round(len(kernels) / options.max_new_tokens, 1)
        cell["device_busy_share"] = round(sum(e.device_time for e in kernels) / 1e6 / wall, 3)
    else:
        operators = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
        cell["operators_per_decode_step"] = round(len(operators) / options.max_new_tokens, 1)
    return cell


# --modes: how the LLM is loaded (server settings)
MODES = {
    "fp16": {"quantization": "none"},
    "bnb-int8": {"quantization": "bnb-int8"},
    "bnb-int8-t0": {"quantization": "bnb-int8", "llm_int8_threshold": 0.0},
    "torchao-int8": {"quantization": "torchao-int8"},
    "torchao-fp8": {"quantization": "torchao-fp8"},
}
WEIGHT_BYTES = {"fp16": 2.0, "bnb-int8": 1.0, "bnb-int8-t0": 1.0, "torchao-int8": 1.0, "torchao-fp8": 1.0}


def load_mode(folder: Path, mode: str, max_batch: int, entry: dict):
    """The models of `folder` with the LLM loaded as `mode` says; the load time and weight sizes go to `entry`."""
    from service.engine.loading import load_models
    from service.settings import Settings

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    settings = Settings(model=str(folder), device=device, dtype="float16" if cuda else "float32",
                        max_batch_size=max_batch, **MODES[mode])  # fmt: skip
    models = load_models(settings)
    gen = models.generation.model
    entry["load_s"] = round(time.perf_counter() - started, 1)
    entry["weights_bytes"] = gen.get_memory_footprint()
    entry["llm_weights_bytes"] = gen.language_model.get_memory_footprint()
    if cuda:
        entry["gpu_allocated_after_load_bytes"] = torch.cuda.memory_allocated()
    log(f"{mode}: loaded in {entry['load_s']} s, weights {entry['weights_bytes'] / 2**30:.2f} GiB")
    return settings, models


def compare_greedy(models, mode: str, out: dict, entry: dict) -> None:
    """The same 16 images answered greedily (10 tokens); after fp16, the answers that differ from fp16's."""
    from service.engine.inference import Runner
    from service.engine.jobs import GenerateJob, GenerationOptions

    greedy = GenerationOptions(max_new_tokens=10)
    tokens = [
        g.text for g in Runner(models)([GenerateJob(image, "", greedy) for image in images(16, seed=7)])
    ]
    out.setdefault("greedy_answers", {})[mode] = tokens
    if "fp16" in out["greedy_answers"]:
        reference = out["greedy_answers"]["fp16"]
        same = sum(a == b for a, b in zip(tokens, reference, strict=True))
        entry["agreement_with_fp16"] = f"{same}/16"
        entry["differences_from_fp16"] = [
            {"image": n, "fp16": b, mode: a}
            for n, (a, b) in enumerate(zip(tokens, reference, strict=True))
            if a != b
        ]


async def measure_cell(batcher, runner, clock: VitClock, batch: int, options, args) -> dict:
    """One cell's timings: a warm-up round, then `args.rounds` batches of `batch` captions (one fewer from 32
    on). The GPU's peak memory counts from here: `peak_memory` reads it."""
    await rounds(batcher, runner, options, batch, 1, seed=1000 * batch)  # warm-up (kernels, allocator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock.seconds = 0.0
    count = args.rounds if batch < 32 else max(1, args.rounds - 1)
    seconds, tokens = await rounds(batcher, runner, options, batch, count, seed=1000 * batch + 1)
    return {
        "captions_per_s": round(batch * count / seconds, 3),
        "seconds_per_batch": round(seconds / count, 4),
        # the batch time outside the ViT, per new token: decode steps (the prefill and Q-Former in it)
        "ms_per_decode_step": round(1000 * (seconds - clock.seconds) / count / args.tokens, 3),
        "vit_share": round(clock.seconds / seconds, 4),
        "rounds": count,
        "mean_new_tokens": tokens,
    }


def peak_memory(rows: int) -> dict:
    """The GPU's peak allocation since `measure_cell` reset it, in all and per decoded row (batch x beams)."""
    peak = torch.cuda.max_memory_allocated()
    return {"peak_gpu_bytes": peak, "peak_gpu_bytes_per_row": peak // rows}


async def measure(folder: Path, mode: str, batches: list[int], args, out: dict, save) -> None:
    from service.engine.batching import Batcher
    from service.engine.decoding import graph_blocker
    from service.engine.inference import Runner
    from service.engine.jobs import GenerationOptions

    cuda = torch.cuda.is_available()
    entry = out.setdefault(mode, {})
    settings, models = load_mode(folder, mode, max(batches + args.greedy_batch_sizes), entry)
    gen = models.generation.model
    roof = Roofline.from_config(json.loads((folder / "config.json").read_text()))
    chip = chip_of(torch.cuda.get_device_name(0)) if cuda else None
    clock = VitClock(gen.vision_model, cuda)
    compare_greedy(models, mode, out, entry)
    beam = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=args.beams)
    greedy_fixed = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    cells = [(f"batch_{b}", b, beam) for b in batches]
    cells += [(f"greedy_batch_{b}", b, greedy_fixed) for b in args.greedy_batch_sizes]
    largest = max(b for _, b, _ in cells)
    for decoder in args.decoders.split(","):
        if decoder == "fast-graphs" and (blocker := graph_blocker(gen.language_model)) is not None:
            entry[f"{decoder}/skipped"] = f"the same steps as `fast`: {blocker}"
            continue
        # `fast-graphs`: the fast decoder with --cuda-graphs (fixed-shape steps replayed as CUDA graphs)
        runner = Runner(
            models,
            decoder=decoder.removesuffix("-graphs"),
            cuda_graphs=decoder == "fast-graphs",
            kv_cache_max_mb=settings.kv_cache_max_mb,  # the server's default cap
        )
        batcher = Batcher(runner, max_batch_size=largest, max_wait_s=0.05, max_queue_size=256)
        batcher.start()
        try:
            for label, batch, options in cells:
                if time.perf_counter() - T0 > args.budget_s:
                    entry.setdefault("skipped", []).append(f"{decoder}/{label}")
                    log(f"{mode} {decoder}: budget spent, {label} skipped")
                    continue
                cell = await measure_cell(batcher, runner, clock, batch, options, args)
                if chip is not None:
                    beams = options.num_beams
                    bound = roof.captions_per_s(batch, beams, args.tokens, 33, *chip, WEIGHT_BYTES[mode])
                    cell["bound_captions_per_s"] = round(bound, 1)
                    cell["percent_of_bound"] = round(100 * cell["captions_per_s"] / bound, 1)
                if decoder == "fast-graphs":  # captures so far (one per shape, unless a cache moved)
                    cell["graph_captures"] = runner.fast_decoder.captures
                    cell["graph_shapes"] = len(runner.fast_decoder.graphs)
                if cuda:
                    cell |= peak_memory(batch * options.num_beams)
                entry[f"{decoder}/{label}"] = cell
                log(f"{mode} {decoder} {label}: {cell}")
                save()
            if mode == args.modes.split(",")[0] and time.perf_counter() - T0 < args.budget_s:
                batch = min(8, max(batches))
                entry[f"{decoder}/profile"] = cell = profile_batch(runner, beam, batch, cuda)
                log(f"{mode} {decoder} profile: {cell}")
                save()
        finally:
            await batcher.stop()
            del runner
    del models, gen
    if cuda:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny widths and depths, for a CPU check")
    parser.add_argument("--modes", default=",".join(MODES), help="LLM precisions, fp16 first (see MODES)")
    parser.add_argument(
        "--decoders",
        default="fast,fast-graphs,transformers",
        help="--decoder values to measure; `fast-graphs`: `fast` with --cuda-graphs",
    )
    parser.add_argument("--batches", default="1,32,64", help="caption batches at --beams")
    parser.add_argument("--greedy-batches", default="64", help="greedy batches (empty: none)")
    parser.add_argument("--tokens", type=int, default=30, help="new tokens per caption (min = max)")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="measured batches per cell (one fewer at 32)")
    parser.add_argument("--budget-s", type=float, default=240, help="start no new cell after this")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    args = parser.parse_args(argv)
    args.greedy_batch_sizes = [int(b) for b in args.greedy_batches.split(",") if b]

    cuda = torch.cuda.is_available()
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "shapes": "small" if args.small else "Salesforce/blip2-opt-2.7b",
        "caption": {"num_beams": args.beams, "new_tokens": args.tokens},
    }
    import transformers

    out["transformers"] = transformers.__version__
    with __import__("contextlib").suppress(ImportError):
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("gpu_shapes_small.json" if args.small else "gpu_shapes.json")

    def save() -> None:
        out["elapsed_s"] = round(time.perf_counter() - T0, 1)
        target.write_text(json.dumps(out, indent=1))

    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 20 * 2**30 else Path(tempfile.gettempdir())
    folder = Path(tempfile.mkdtemp(prefix="blip2-opt27b-shapes-", dir=base))
    try:
        out["parameters"] = build(folder, args.small, torch.device("cuda" if cuda else "cpu"))
        save()
        batches = [int(b) for b in args.batches.split(",")]
        fp8 = cuda and torch.cuda.get_device_capability(0) >= (8, 9)
        for mode in args.modes.split(","):
            if time.perf_counter() - T0 > args.budget_s:
                out.setdefault("skipped_modes", {})[mode] = "the time budget was spent"
                continue
            if mode == "torchao-fp8" and not fp8:
                out.setdefault("skipped_modes", {})[mode] = (
                    "this device has no FP8 (compute capability < 8.9)"
                )
                continue
            try:
                asyncio.run(measure(folder, mode, batches, args, out, save))
            except Exception as exc:  # record it and go on to the next mode
                out.setdefault("errors", {})[mode] = f"{type(exc).__name__}: {exc}"
                log(f"{mode} failed: {exc!r}")
            save()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        save()
    print(json.dumps(out, indent=1))
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
