"""The model thread's share of a request, without the server: `Runner` with `--decoder transformers` and with
`--decoder fast` over the same loaded models, side by side in alternating rounds.

Each cell runs batches of B requests of one route (the routes' own settings and prompts for the model
family: /caption beam 5 with min 8 new tokens, /vqa beam 5 with length penalty -1) on easy-VQA test images,
and prints the median milliseconds per batch of `--rounds` rounds for each decoder and their ratio. It also
splits each batch into the LLM's decoding (prefill and steps: `generate()`, or the fast decoder) and the rest
(image processor, ViT, Q-Former, tokenizers), the same work for both; "if decoding were free" is the
ratio a decoder that took no time at all would reach, the ceiling any decoder has on this model thread.
What is left between these figures and `serve_load.py --compare decoder` is the server (HTTP, JSON, images,
the batcher) and the load generator, which share the same CPUs.

    OMP_NUM_THREADS=1 python bench/decoder_runner.py --batches 1,11,32 --routes caption,vqa
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import easy_vqa_set, machine, model_folder, now  # noqa: E402

from service.engine.inference import Runner  # noqa: E402
from service.engine.jobs import GenerateJob, GenerationOptions  # noqa: E402
from service.engine.loading import load_models  # noqa: E402
from service.engine.tasks import task_profiles  # noqa: E402
from service.settings import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="auto", help="as in serve_load.py")
    parser.add_argument("--batches", default="1,11,32", help="requests per batch")
    parser.add_argument("--routes", default="caption,vqa")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per decoder and cell")
    parser.add_argument(
        "--requests", type=int, default=100, help="requests per timed round (at least 10 batches)"
    )
    args = parser.parse_args(argv)

    folder, label = model_folder(args.model)
    settings = Settings(model=str(folder / "generation"), load_in_8bit=False, vision_cache_size=0)
    models = load_models(settings)
    runners = {decoder: Runner(models, decoder=decoder) for decoder in ("transformers", "fast")}
    decoding = {decoder: 0.0 for decoder in runners}  # seconds spent in the LLM's decoding, per decoder
    timed(models.generation.model.language_model, "generate", decoding, "transformers")
    timed(runners["fast"].fast_decoder, "generate", decoding, "fast")
    tasks = task_profiles(models.generation, settings)
    corpus = easy_vqa_set(256)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png, _, _ in corpus]
    print(f"# decoder_runner {now()} | model: {label} | machine: {machine()}")
    print(
        "| route | batch | ms per batch transformers | ms per batch fast | transformers/fast "
        "| decoding ms transformers | decoding ms fast | rest ms (both) | if decoding were free |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for route in args.routes.split(","):
        options = GenerationOptions(**(tasks.caption if route == "caption" else tasks.vqa).defaults)
        for size in [int(b) for b in args.batches.split(",")]:
            batches = [
                [
                    GenerateJob(
                        images[n % len(images)],
                        tasks.caption.prompt
                        if route == "caption"
                        else tasks.vqa.template.format(corpus[n % len(corpus)][1]),
                        options,
                    )
                    for n in range(start * size, (start + 1) * size)
                ]
                for start in range(max(10, args.requests // size))
            ]
            times: dict[str, list[float]] = {decoder: [] for decoder in runners}
            decoded: dict[str, list[float]] = {decoder: [] for decoder in runners}
            for _ in range(args.rounds):
                for decoder, runner in runners.items():
                    runner(batches[0])  # warm
                    decoding[decoder] = 0.0
                    started = time.perf_counter()
                    for batch in batches:
                        runner(batch)
                    times[decoder].append((time.perf_counter() - started) / len(batches) * 1e3)
                    decoded[decoder].append(decoding[decoder] / len(batches) * 1e3)
            slow, fast = statistics.median(times["transformers"]), statistics.median(times["fast"])
            slow_decoding, fast_decoding = (statistics.median(decoded[d]) for d in ("transformers", "fast"))
            rest = (slow - slow_decoding + fast - fast_decoding) / 2
            print(
                f"| /{route} | {size} | {slow:.2f} | {fast:.2f} | **{slow / fast:.2f}x** | {slow_decoding:.2f} | "
                f"{fast_decoding:.2f} | {rest:.2f} | {slow / rest:.2f}x |",
                flush=True,
            )
    return 0


def timed(owner: object, name: str, totals: dict[str, float], key: str) -> None:
    """Adds the seconds each call of `owner.name` takes to `totals[key]`."""
    method = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    sys.exit(main())
