"""Weight footprint of the generation model by LLM precision, and answer agreement with full precision.

Each variant loads through the server's own loader (`service.engine.loading.load_models`) in a fresh process on
the CPU: fp32; bf16 and fp16 (`--dtype`: the whole model); 8-bit and 4-bit NF4 LLM (bitsandbytes; ViT,
Q-Former and projection stay fp32). Footprint is measured two ways: the bytes of the loaded tensors
(`get_memory_footprint()`, whole model and LLM alone) and the process's resident-set growth over loading.
Agreement: the variant's answers to a fixed set of easy-VQA test questions (the server's /vqa settings:
beam 5, at most 10 tokens, length penalty -1, the model family's prompt) equal to fp32's, exact string.

    python bench/memory.py                  # default model if present, else tiny-opt
    python bench/memory.py --questions 128 --variants fp32,8bit
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, easy_vqa_set, machine, model_folder, now, rss_bytes  # noqa: E402

VARIANTS = {
    "fp32": {"dtype": "float32", "load_in_8bit": False},
    "bf16": {"dtype": "bfloat16", "load_in_8bit": False},
    "fp16": {"dtype": "float16", "load_in_8bit": False},
    "8bit": {"dtype": "float32", "load_in_8bit": True},
    "4bit": {"dtype": "float32", "load_in_8bit": False, "load_in_4bit": True},
}


def child(variant: str, folder: str, questions: int, batch: int) -> dict:
    """Runs in its own process: load one variant, answer the questions."""
    import io

    from PIL import Image

    from service.api.schemas import VqaRequest
    from service.engine.inference import Runner
    from service.engine.jobs import GenerateJob
    from service.engine.loading import load_models
    from service.engine.tasks import task_profiles
    from service.settings import Settings

    before = rss_bytes()
    settings = Settings(model=folder, retrieval_model=None, device="cpu", **VARIANTS[variant])
    models = load_models(settings)
    after = rss_bytes()
    model = models.generation.model
    runner = Runner(models)
    vqa = task_profiles(models.generation, settings).vqa
    template, options = vqa.template, vqa.options(VqaRequest(question="x"))
    corpus = easy_vqa_set(questions)
    answers = []
    for start in range(0, len(corpus), batch):
        jobs = [
            GenerateJob(Image.open(io.BytesIO(png)).convert("RGB"), template.replace("{}", question), options)
            for png, question, _ in corpus[start : start + batch]
        ]
        answers += [r.text for r in runner(jobs)]
    return {
        "variant": variant,
        "weights_bytes": model.get_memory_footprint(),
        "llm_bytes": model.language_model.get_memory_footprint(),
        "rss_growth_bytes": after - before,
        "quantization": models.quantization,
        "answers": answers,
        "truth": [answer for _, _, answer in corpus],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="auto", help="`auto`, `tiny-opt`, or a folder holding generation/")
    parser.add_argument("--variants", default="fp32,bf16,fp16,8bit,4bit")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder, label = model_folder(args.model)
    generation = str(folder / "generation")
    if args.child:
        print(json.dumps(child(args.child, generation, args.questions, args.batch)))
        return 0

    env = child_env()
    results = {}
    for variant in args.variants.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--model", str(folder), "--child", variant, "--questions", str(args.questions),
             "--batch", str(args.batch)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            results[variant] = {
                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
            }
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = results.get("fp32", {}).get("answers")
    print(f"# memory {now()} | model: {label} ({generation}) | machine: {machine()}")
    print(
        f"# {args.questions} easy-VQA test questions, /vqa settings (beam 5, <=10 tokens, length penalty -1)\n"
    )
    print(
        "| LLM | whole model weights (MiB) | LLM weights (MiB) | LLM vs fp32 | RSS growth on load (MiB) | answers equal to fp32 | accuracy vs truth |"
    )
    print("|---|---|---|---|---|---|---|")
    fp32_llm = results.get("fp32", {}).get("llm_bytes")
    for variant, r in results.items():
        if "error" in r:
            print(f"| {variant} | failed: {r['error']} | | | | | |")
            continue
        agree = (
            sum(a == b for a, b in zip(r["answers"], reference, strict=True)) / len(reference)
            if reference
            else float("nan")
        )
        accuracy = sum(a.strip().lower() == t for a, t in zip(r["answers"], r["truth"], strict=True)) / len(
            r["truth"]
        )
        ratio = f"{r['llm_bytes'] / fp32_llm:.2f}x" if fp32_llm else "-"
        print(
            f"| {variant} | {r['weights_bytes'] / 2**20:.2f} | {r['llm_bytes'] / 2**20:.2f} | {ratio} | "
            f"{r['rss_growth_bytes'] / 2**20:.1f} | {agree:.1%} | {accuracy:.1%} |"
        )
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
