"""Memory of full vs LoRA Q-Former fine-tuning at the paper's Q-Former size, on the CPU.

The Q-Former is BERT-base shaped (768 wide, 12 layers, cross-attention every 2nd layer, 32 queries)
reading 1408-wide features of 257 image tokens, the shape of EVA ViT-g/14 at 224 px; it is assembled
through `blip2-train init` from a randomly initialised BERT-base. The frozen ViT is the same in both
variants and does not change the comparison, so the features are cached (`data cache-features`) from a
tower with no blocks. Each variant runs `blip2-train finetune --task retrieval` (ITC+ITM+ITG) for a few
steps in a fresh process; the figures are that process's peak resident set (getrusage) and the bytes of
trainable parameters, which set the size of their gradients and of AdamW's two moment buffers.

Quality at equal settings is compared on easy-VQA in docs/FINETUNE.md: a random BERT-base learns nothing
in a CPU-sized run, so this script measures memory only.

    python bench/lora_memory.py                      # full, LoRA r=8 and r=16; batch 2, 2 steps
    python bench/lora_memory.py --ranks 8 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, child_env, machine, now  # noqa: E402

WORK = CACHE / "lora-memory"
VISION = {  # EVA ViT-g/14 at 224 px as BLIP-2 sees it; no blocks: its outputs are cached below
    "hidden_size": 1408, "intermediate_size": 6144, "num_attention_heads": 16, "num_hidden_layers": 0,
    "image_size": 224, "patch_size": 14,
}  # fmt: skip


def prepare(images: int) -> None:
    """A BERT-base-shaped random BERT, the assembled stage-1 folder, a manifest and its cached features."""
    from PIL import Image
    from transformers import BertConfig, BertModel

    from training.cli import main as blip2_train
    from training.data import write_jsonl
    from training.vocab import qformer_tokenizer

    if (WORK / "features" / "index.json").exists():
        return
    tokenizer = qformer_tokenizer()
    bert = WORK / "bert-base-random"
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(
        bert
    )
    tokenizer.save_pretrained(bert)
    (WORK / "vision.json").write_text(json.dumps(VISION))
    blip2_train(["init", "--qformer-bert", str(bert), "--vision-config", str(WORK / "vision.json")]
                + ["--num-query-tokens", "32", "--output", str(WORK / "init")])  # fmt: skip
    (WORK / "images").mkdir(exist_ok=True)
    rows = []
    for index in range(images):
        colour = ("red", "green", "blue", "white")[index % 4]
        Image.new("RGB", (224, 224), colour).save(WORK / "images" / f"{index}.png")
        rows.append({"image": f"images/{index}.png", "text": f"a plain {colour} square number {index}"})
    write_jsonl(WORK / "captions.jsonl", rows)
    blip2_train(["data", "cache-features", "--manifest", str(WORK / "captions.jsonl"), "--model",
                 str(WORK / "init" / "stage1"), "--output", str(WORK / "features")])  # fmt: skip


def child(rank: int, steps: int, batch_size: int) -> dict:
    """One fine-tuning run in this process; its peak RSS and its trainable parameter bytes."""
    from training.data import FeatureDataset
    from training.finetune import build_finetune
    from training.lora import count_parameters
    from training.settings import FinetuneSettings
    from training.trainer import train

    settings = FinetuneSettings(
        task="retrieval", init=str(WORK / "init" / "stage1"), train_manifest=str(WORK / "captions.jsonl"),
        features=str(WORK / "features"), output=str(WORK / f"run-r{rank}"), steps=steps, batch_size=batch_size,
        lora_rank=rank, lr=1e-4, warmup_steps=1, log_every=1, save_every=10**6, progress=False,
    )  # fmt: skip
    setup = build_finetune(settings)
    parameters = count_parameters(setup.task)  # before training: the adapters are merged away when it saves
    trainable_bytes = sum(p.numel() * p.element_size() for p in setup.task.parameters() if p.requires_grad)
    summary = train(
        setup.task,
        FeatureDataset(settings.train_manifest, settings.features, setup.text_field),
        setup.collate,
        settings,
    )
    return {
        "rank": rank,
        "parameters": parameters,
        "trainable_bytes": trainable_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "last_loss": (summary.get("last_losses") or {}).get("loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="8,16", help="LoRA ranks to compare with full fine-tuning")
    parser.add_argument("--steps", type=int, default=2, help="AdamW allocates its state on the first step")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.batch_size)))
        return 0

    prepare(args.images)
    env = child_env()
    results = []
    for rank in [0, *(int(r) for r in args.ranks.split(",") if r)]:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(rank), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"# lora_memory {now()} | machine: {machine()}")
    print(
        f"# finetune --task retrieval, BERT-base-shaped Q-Former (32 queries, 1408-wide image features), "
        f"batch {args.batch_size}, {args.steps} steps, fp32 on the CPU\n"
    )
    print(
        "| variant | parameters | trainable | trainable MiB (x3 with grads + AdamW moments) | peak RSS MiB | vs full |"
    )
    print("|---|---|---|---|---|---|")
    full_rss = results[0]["peak_rss_bytes"]
    for r in results:
        name = "full Q-Former" if r["rank"] == 0 else f"LoRA r={r['rank']}"
        print(
            f"| {name} | {r['parameters']['total']:,} | {r['parameters']['trainable']:,} | "
            f"{r['trainable_bytes'] / 2**20:.1f} ({3 * r['trainable_bytes'] / 2**20:.0f}) | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / full_rss:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
