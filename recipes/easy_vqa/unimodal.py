"""Unimodal pretraining for the easy-VQA recipe: the parts BLIP-2 takes as given, obtained before the Q-Former.

- `vision`: a small ViT (`Blip2VisionModel`) trained CLIP-style on the train split's image-caption pairs
  (the analogue of the paper's frozen CLIP / EVA-CLIP encoders). The text tower is a bag of learned word
  embeddings with a projection; it is thrown away, only the vision tower is saved.
- `llm`: a small OPT trained as a plain language model on the train split's text alone (questions with
  their answers, captions). Each training text is preceded by its image's caption, written as exactly
  `num_query_tokens` token embeddings at positions 0..N-1, where BLIP-2 later puts the projected queries:
  the LLM learns to read a fixed-length context there, which is what the Q-Former will have to fill.
- `bert`: a small BERT (masked language modelling on the same text) with the Q-Former's WordPiece
  tokenizer, which `blip2-train init --qformer-bert` copies into the Q-Former as BLIP-2 does with BERT-base.

Run: `python -m recipes.easy_vqa.unimodal {vision,llm,bert} --data DATA --output FOLDER [...]`.
Each writes a transformers folder (safetensors) and `<output>/log.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blip2.prompts import DEFAULT_PROMPTS, INSTRUCT_CAPTION_PROMPT
from training.data import read_jsonl
from training.trainer import JsonLog

# The prompts the server uses for an InstructBLIP model: the shipped model is trained on them.
CAPTION_PROMPT = INSTRUCT_CAPTION_PROMPT
VQA_PROMPT = DEFAULT_PROMPTS["vqa"]


def cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """Not the trainer's `cosine_lr`: this warm-up reaches lr/warmup at step 0 (the trainer's starts at
    warmup_lr), and the shipped parts were trained with exactly this arithmetic; the trainer's schedule would
    no longer reproduce them bit for bit."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class Log(JsonLog):
    """The trainer's JSON log, started afresh, each line with the seconds since the start."""

    def __init__(self, output: Path) -> None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "log.jsonl").unlink(missing_ok=True)
        super().__init__(output / "log.jsonl")
        self.start = time.time()

    def __call__(self, **record) -> None:
        self.write(record | {"elapsed_s": round(time.time() - self.start, 1)})


# -- vision tower, CLIP-style --------------------------------------------------------------------------
def load_images(data: Path, rows: list[dict], size: int) -> torch.Tensor:
    """All images of the rows as one normalised (N, 3, size, size) tensor (CLIP mean/std, as BLIP-2)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    arrays = []
    for row in rows:
        with Image.open(data / row["image"]) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (pixels - mean) / std


def augment(pixels: torch.Tensor, shift: int = 4) -> torch.Tensor:
    """Horizontal flips and small translations (edge-replicated); shapes are never cut off."""
    flip = torch.rand(pixels.shape[0]) < 0.5
    pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    padded = F.pad(pixels, (shift,) * 4, mode="replicate")
    size = pixels.shape[-1]
    out = torch.empty_like(pixels)
    for i, (dx, dy) in enumerate(torch.randint(0, 2 * shift + 1, (pixels.shape[0], 2)).tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


class BagOfWords(nn.Module):
    """The throw-away text tower: mean of learned word embeddings, then a linear projection."""

    def __init__(self, vocab: int, width: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, width, mode="mean")
        self.proj = nn.Linear(width, dim)

    def forward(self, ids: list[list[int]]) -> torch.Tensor:
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        flat = torch.tensor([t for x in ids for t in x])
        return self.proj(self.embed(flat, offsets))


def vision_config(args) -> dict:
    return {
        "hidden_size": args.width,
        "intermediate_size": args.width * 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "initializer_range": 0.02,  # transformers' default 1e-10 makes a fresh tower output a constant
        "layer_norm_eps": 1e-6,
    }


def pretrain_vision(args) -> dict:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data, output = Path(args.data), Path(args.output)
    log = Log(output)
    train = read_jsonl(data / "captions_train.jsonl")
    test = [r for r in read_jsonl(data / "captions_test.jsonl") if not r["text"].endswith(" shape")]
    test = [r for r in test if len(r["text"].split()) == 3]  # full captions: colour and shape
    words = sorted({w for r in train + test for w in r["text"].split()})
    vocab = {w: i for i, w in enumerate(words)}
    texts = sorted({r["text"] for r in train})
    text_index = {t: i for i, t in enumerate(texts)}
    text_ids = [[vocab[w] for w in t.split()] for t in texts]
    train_pixels = load_images(data, train, args.image_size)
    test_pixels = load_images(data, test, args.image_size)
    train_text = torch.tensor([text_index[r["text"]] for r in train])

    tower = Blip2VisionModel(Blip2VisionConfig(**vision_config(args)))
    head = nn.Linear(args.width, args.embed_dim)
    text_tower = BagOfWords(len(vocab), args.width, args.embed_dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*tower.parameters(), *head.parameters(), *text_tower.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))

    def image_embeds(pixels: torch.Tensor) -> torch.Tensor:
        pooled = tower(pixel_values=pixels).pooler_output  # post-LayerNorm [CLS]
        return F.normalize(head(pooled), dim=-1)

    def evaluate() -> float:
        """Zero-shot: each full-caption test image against every distinct full caption."""
        tower.eval()
        candidates = sorted({r["text"] for r in test} | {t for t in texts if len(t.split()) == 3})
        with torch.no_grad():
            text = F.normalize(text_tower([[vocab[w] for w in t.split()] for t in candidates]), dim=-1)
            hits = 0
            for start in range(0, len(test), 256):
                sims = image_embeds(test_pixels[start : start + 256]) @ text.T
                predicted = [candidates[i] for i in sims.argmax(-1).tolist()]
                hits += sum(p == r["text"] for p, r in zip(predicted, test[start : start + 256], strict=True))
        tower.train()
        return 100.0 * hits / len(test)

    tower.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, args.steps, args.lr, args.warmup)
        index = torch.randint(0, len(train), (args.batch_size,))
        images = image_embeds(augment(train_pixels[index]))
        labels = train_text[index]
        text = F.normalize(text_tower([text_ids[i] for i in labels.tolist()]), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * images @ text.T
        # captions repeat across images: every pair with the same caption is a positive
        positive = (labels[:, None] == labels[None, :]).float()
        targets = positive / positive.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            record = {"step": step, "loss": round(loss.item(), 4), "lr": optimizer.param_groups[0]["lr"]}
            if step % args.eval_every == 0 or step == args.steps - 1:
                record["zero_shot_test_acc"] = round(evaluate(), 2)
            log(**record)
    tower.eval()
    tower.save_pretrained(output)
    summary = {"part": "vision", "steps": args.steps, "zero_shot_test_acc": evaluate(), "output": str(output)}
    summary["parameters"] = sum(p.numel() for p in tower.parameters())
    log(summary=summary)
    return summary


# -- LLM, text only ------------------------------------------------------------------------------------
def caption_table(data: Path, split: str = "train") -> dict[str, str]:
    return {r["image"]: r["text"] for r in read_jsonl(data / f"captions_{split}.jsonl")}


def llm_texts(data: Path) -> list[tuple[str, str, str]]:
    """(context caption, prompt, target) triples from the train split: each question with its answer, and
    each caption after the caption prompt. The context is the image's caption ("a blue circle")."""
    captions = caption_table(data)
    triples = []
    for row in read_jsonl(data / "vqa_train.jsonl"):
        if row["image"] in captions:
            triples.append((captions[row["image"]], VQA_PROMPT.format(row["question"]), row["answer"]))
    for caption in captions.values():
        triples.append((caption, CAPTION_PROMPT, caption))
    return triples


def context_ids(tokenizer, caption: str, length: int) -> list[int]:
    """A caption as exactly `length` token ids: the caption's tokens, then padding (zero embeddings)."""
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"][:length]
    return ids + [tokenizer.pad_token_id] * (length - len(ids))


def pretrain_llm(args) -> dict:
    from transformers import AutoModelForCausalLM, OPTConfig

    from training.vocab import preset_llm_tokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data, output = Path(args.data), Path(args.output)
    log = Log(output)
    tokenizer = preset_llm_tokenizer("opt")
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=args.width, word_embed_proj_dim=args.width,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, ffn_dim=args.width * 4,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0, init_std=0.02,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    pairs = llm_texts(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    model.train()
    n = args.context_length
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, args.steps, args.lr, args.warmup)
        batch = rng.sample(pairs, args.batch_size)
        rows = []
        for caption, prompt, target in batch:
            # </s> prompt target </s>, tokenized as Stage2Task does
            ids = tokenizer(f"{prompt} {target}")["input_ids"] + [tokenizer.eos_token_id]
            # the context is given, never a target, nor is the first text token (</s>); with
            # --loss-on target the prompt is context too (an instruction-tuned LM, still text only)
            given = len(tokenizer(prompt)["input_ids"]) if args.loss_on == "target" else 1
            rows.append((context_ids(tokenizer, caption, n), ids, given))
        width = max(len(ids) for _, ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ctx + ids + [pad] * (width - len(ids)) for ctx, ids, _ in rows])
        attention = torch.tensor([[1] * (n + len(ids)) + [0] * (width - len(ids)) for _, ids, _ in rows])
        labels = torch.tensor(
            [[-100] * (n + g) + ids[g:] + [-100] * (width - len(ids)) for _, ids, g in rows]
        )
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log(step=step, loss=round(loss.item(), 4), lr=optimizer.param_groups[0]["lr"])
    model.eval()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    accuracy = llm_answer_accuracy(model, tokenizer, data, n)
    summary = {"part": "llm", "steps": args.steps, "output": str(output)}
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    summary["test_answer_acc_given_true_caption"] = accuracy
    (output / "answer_accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    summary["loss_on"] = args.loss_on
    log(summary=summary)
    return summary


@torch.no_grad()
def llm_answer_accuracy(model, tokenizer, data: Path, n: int, limit: int = 400) -> float:
    """Greedy answers to test questions with the TRUE caption as context, on images whose caption names
    colour and shape: what the LLM can answer when the Q-Former passes on everything, per question type."""
    captions = {k: v for k, v in caption_table(data, "test").items() if not v.endswith(" shape")}
    captions = {k: v for k, v in captions.items() if len(v.split()) == 3}
    rows = [r for r in read_jsonl(data / "vqa_test.jsonl") if r["image"] in captions][:limit]
    hits: dict[str, list[bool]] = {}
    for row in rows:
        ids = (
            context_ids(tokenizer, captions[row["image"]], n)
            + tokenizer(VQA_PROMPT.format(row["question"]))["input_ids"]
        )
        # every context position is attended, padding included, as in training (and as the queries will be)
        inputs = torch.tensor([ids])
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
        hits.setdefault(row["question_type"], []).append(answer == row["answer"])
    result = {k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(hits.items())}
    result["all"] = round(100.0 * sum(sum(v) for v in hits.values()) / len(rows), 2)
    return result


# -- BERT for the Q-Former -----------------------------------------------------------------------------
def pretrain_bert(args) -> dict:
    from transformers import BertConfig, BertForMaskedLM

    from training.vocab import qformer_tokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data, output = Path(args.data), Path(args.output)
    log = Log(output)
    tokenizer = qformer_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=args.width, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.width * 4, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertForMaskedLM(config)
    texts = [
        VQA_PROMPT.format(r["question"]) + " " + r["answer"] for r in read_jsonl(data / "vqa_train.jsonl")
    ]
    texts += [r["text"] for r in read_jsonl(data / "captions_train.jsonl")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, args.steps, args.lr, args.warmup)
        tokens = tokenizer(rng.sample(texts, args.batch_size), padding=True, return_tensors="pt")
        ids = tokens["input_ids"]
        maskable = ~torch.isin(ids, special)
        chosen = (torch.rand(ids.shape) < 0.15) & maskable
        labels = ids.masked_fill(~chosen, -100)
        inputs = ids.masked_fill(chosen & (torch.rand(ids.shape) < 0.8), tokenizer.mask_token_id)
        loss = model(input_ids=inputs, attention_mask=tokens["attention_mask"], labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log(step=step, loss=round(loss.item(), 4), lr=optimizer.param_groups[0]["lr"])
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    summary = {"part": "bert", "steps": args.steps, "output": str(output)}
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    log(summary=summary)
    return summary


def evaluate_llm(args) -> dict:
    """Re-measure a pretrained LLM folder's answers with the true caption as context."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.output).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    accuracy = llm_answer_accuracy(model, tokenizer, Path(args.data), args.context_length)
    (Path(args.output) / "answer_accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    print(json.dumps({"summary": {"test_answer_acc_given_true_caption": accuracy}}))
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    defaults = {
        "vision": dict(steps=3000, batch_size=128, lr=1e-3, width=128, layers=4, heads=4),
        "llm": dict(steps=2500, batch_size=64, lr=2e-3, width=128, layers=4, heads=4),
        "bert": dict(steps=400, batch_size=64, lr=1e-3, width=128, layers=4, heads=4),
    }
    for part, values in defaults.items():
        p = sub.add_parser(part)
        p.add_argument("--data", required=True, help="folder written by `blip2-train data easy-vqa`")
        p.add_argument("--output", required=True)
        for name, value in values.items():
            p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
        p.add_argument("--warmup", type=int, default=100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--log-every", type=int, default=50)
        if part == "vision":
            p.add_argument("--image-size", type=int, default=64)
            p.add_argument("--patch-size", type=int, default=8)
            p.add_argument("--embed-dim", type=int, default=128)
            p.add_argument("--eval-every", type=int, default=500)
        if part == "llm":
            p.add_argument("--context-length", type=int, default=8, help="= the number of query tokens")
            p.add_argument(
                "--loss-on",
                default="text",
                choices=["text", "target"],
                help="LM loss on the whole text, or on the answer/caption only",
            )
    p = sub.add_parser("llm-eval", help="re-measure a pretrained LLM folder (--output) given true captions")
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--context-length", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = {"vision": pretrain_vision, "llm": pretrain_llm, "bert": pretrain_bert, "llm-eval": evaluate_llm}
    parts[args.part](args)


if __name__ == "__main__":
    main()
