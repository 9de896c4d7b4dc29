"""`blip2-train eval --task vqa|caption|retrieval`: the paper's evaluation protocols, batched.

Generation (vqa, caption) goes through the checkpoint's own processor and `generate()`, exactly as a
user of plain transformers would run it (BLIP-2 or InstructBLIP folders alike). Retrieval follows
LAVIS: ITC similarity for all image-text pairs, the top k candidates of each query re-ranked by ITM,
final score ITM logit + ITC similarity. Each run writes `<output>/metrics.json` and
`<output>/predictions.jsonl` and prints a table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.data import (
    IMAGE_ERRORS,
    group_by_image,
    image_problem,
    load_image,
    read_manifest,
    text_tokens,
    write_jsonl,
)
from training.finetune import resolve_prompt
from training.metrics import VQA_SCORING, caption_metrics, retrieval_recall, vqa_metrics
from training.settings import EvalSettings
from training.stages import caption_ids

log = logging.getLogger(__name__)

GENERATION_DEFAULTS = {  # the paper's settings: zero-shot VQA and captioning
    "vqa": {"max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": -1.0},
    "caption": {"max_new_tokens": 30, "min_new_tokens": 8, "length_penalty": 1.0},
}


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _bar(iterable, progress: bool, desc: str):
    return tqdm(iterable, desc=desc, disable=not progress, file=sys.stderr)


def load_generation_model(folder: str, device: torch.device):
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        InstructBlipForConditionalGeneration,
    )

    kind = AutoConfig.from_pretrained(folder).model_type
    model_class = (
        InstructBlipForConditionalGeneration if kind == "instructblip" else Blip2ForConditionalGeneration
    )
    model = model_class.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return model, AutoProcessor.from_pretrained(folder)


def _images(paths: list[str]) -> tuple[list, list[bool]]:
    images, ok = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            ok.append(True)
        except IMAGE_ERRORS as error:
            log.warning("unreadable image %s: %s", path, error)
            images.append(load_image_placeholder())
            ok.append(False)
    return images, ok


def load_image_placeholder():
    from PIL import Image

    return Image.new("RGB", (32, 32))


@torch.no_grad()
def generate_texts(
    model, processor, paths: list[str], prompts: list[str], batch_size: int, progress: bool, **generate_kwargs
) -> list[str]:
    """Batched generation; returns only the generated continuation of each prompt (with
    `num_return_sequences=n`, n consecutive texts per image)."""
    device = next(model.parameters()).device
    decoder_only = model.config.use_decoder_only_language_model
    per_image = generate_kwargs.get("num_return_sequences", 1)
    outputs: list[str] = []
    for start in _bar(range(0, len(paths), batch_size), progress, f"generate ({len(paths)} images)"):
        images, ok = _images(paths[start : start + batch_size])
        batch_prompts = prompts[start : start + batch_size]
        if any(batch_prompts):
            inputs = processor(images=images, text=batch_prompts, padding=True, return_tensors="pt")
            prefix = inputs["input_ids"].shape[1]
            if hasattr(processor, "qformer_tokenizer"):
                # InstructBlipProcessor pads the Q-Former's text on the LLM tokenizer's (left) side; the
                # Q-Former was trained right-padded and BERT's positions are absolute.
                qformer = processor.qformer_tokenizer(
                    batch_prompts, padding=True, padding_side="right", return_tensors="pt"
                )
                inputs["qformer_input_ids"] = qformer["input_ids"]
                inputs["qformer_attention_mask"] = qformer["attention_mask"]
        else:  # no prompt: generate() starts from the query tokens and bos
            inputs = processor(images=images, return_tensors="pt")
            prefix = model.config.num_query_tokens + 1
        inputs = {k: v.to(device) for k, v in inputs.items()}
        generated = model.generate(**inputs, **generate_kwargs)
        if decoder_only:
            generated = generated[:, prefix:]
        texts = processor.batch_decode(generated, skip_special_tokens=True)
        good = [flag for flag in ok for _ in range(per_image)]
        outputs += [t.strip() if g else "" for t, g in zip(texts, good, strict=True)]
    return outputs


def _options(s: EvalSettings) -> dict:
    defaults = GENERATION_DEFAULTS[s.task]
    options = {k: defaults[k] if getattr(s, k) is None else getattr(s, k) for k in defaults}
    return options | {"num_beams": s.num_beams, "do_sample": False}


def _generate(s: EvalSettings, model, processor, paths, prompts, options) -> list[str]:
    return generate_texts(model, processor, paths, prompts, s.batch_size, s.progress, **options)


def _rows(s: EvalSettings) -> list[dict]:
    rows = read_manifest(s.manifest)
    return rows[: s.limit] if s.limit > 0 else rows


def evaluate_vqa(s: EvalSettings, rows: list[dict]) -> tuple[dict, list[dict]]:
    model, processor = load_generation_model(s.model, _device(s.device))
    template = resolve_prompt("vqa", s.prompt)
    prompts = [template.format(row["question"]) for row in rows]
    options = _options(s)
    answers = _generate(s, model, processor, [r["image"] for r in rows], prompts, options)
    metrics = vqa_metrics(answers, rows, scoring=s.vqa_scoring) | {
        "generation": options | {"prompt": template}
    }
    predictions = [
        {
            "question_id": r.get("question_id", i),
            "question": r["question"],
            "prediction": a,
            "answer": r.get("answer"),
        }
        for i, (r, a) in enumerate(zip(rows, answers, strict=True))
    ]
    return metrics, predictions


def evaluate_caption(s: EvalSettings, rows: list[dict]) -> tuple[dict, list[dict]]:
    model, processor = load_generation_model(s.model, _device(s.device))
    row_image, first_rows = group_by_image(rows)
    paths = [row["image"] for row in first_rows]
    references: list[list[str]] = [[] for _ in first_rows]
    for row, index in zip(rows, row_image, strict=True):
        references[index].append(row["text"])
    prompt = resolve_prompt("caption", s.prompt)
    options = _options(s)
    captions = _generate(s, model, processor, paths, [prompt] * len(paths), options)
    predictions = {str(i): c for i, c in enumerate(captions)}
    references_by_id = {str(i): refs for i, refs in enumerate(references)}
    metrics = caption_metrics(predictions, references_by_id, java=None if s.java_metrics else False)
    if metrics["tokenizer"] != "ptb":
        _warn_python_tokenizer("--no-java-metrics was given" if not s.java_metrics else "no Java on PATH")
    metrics |= {"images": len(paths), "generation": options | {"prompt": prompt}}
    listed = [
        {"image": path, "caption": c, "references": refs}
        for path, c, refs in zip(paths, captions, references, strict=True)
    ]
    return metrics, listed


def _warn_python_tokenizer(reason: str) -> None:
    """Caption figures from the Python tokenizer are not comparable with published ones (those use the PTB
    tokenizer, which needs Java): said in the log and, in case logging goes elsewhere, on stderr."""
    message = (
        f"caption metrics use the Python tokenizer ({reason}): BLEU/CIDEr are NOT comparable with published "
        'figures (PTB tokenizer, needs Java); metrics.json says "tokenizer": "python"'
    )
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


@torch.no_grad()
def itc_image_features(
    model, processor, image_paths: list[str], batch_size: int, progress: bool, keep_vit_output: bool = True
):
    """Per image: the ViT output (for ITM; None unless `keep_vit_output`, as it is images x tokens x width)
    and the projected, normalised query features (for ITC)."""
    retrieval = model.retrieval
    device = next(model.parameters()).device
    image_embeds, image_feats = [], []
    for start in _bar(range(0, len(image_paths), batch_size), progress, f"images ({len(image_paths)})"):
        images, _ = _images(image_paths[start : start + batch_size])
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        embeds = retrieval.vision_model(pixel_values=pixels).last_hidden_state
        queries = retrieval.query_tokens.expand(embeds.shape[0], -1, -1)
        query_out = retrieval.qformer(query_embeds=queries, encoder_hidden_states=embeds).last_hidden_state
        if keep_vit_output:
            image_embeds.append(embeds)
        image_feats.append(F.normalize(retrieval.vision_projection(query_out), dim=-1))
    return (torch.cat(image_embeds) if keep_vit_output else None), torch.cat(image_feats)


@torch.no_grad()
def itc_text_features(model, tokens: dict, batch_size: int) -> torch.Tensor:
    """Per text: the projected, normalised [CLS] output of the Q-Former's text-only pass."""
    retrieval = model.retrieval
    feats = []
    for start in range(0, tokens["input_ids"].shape[0], batch_size):
        ids = tokens["input_ids"][start : start + batch_size]
        mask = tokens["attention_mask"][start : start + batch_size]
        hidden = retrieval.qformer(
            query_embeds=retrieval.embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
        feats.append(F.normalize(retrieval.text_projection(hidden[:, 0]), dim=-1))
    return torch.cat(feats)


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(images, texts): the best cosine over the image's query features, as BLIP-2's ITC (no temperature)."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(-1)


@torch.no_grad()
def retrieval_scores(
    model, processor, image_paths: list[str], texts: list[str], s
) -> dict[str, torch.Tensor]:
    """ITC similarity of every pair, then each query's top k re-ranked by ITM: final = ITM logit + ITC."""
    from training.losses import qformer_pass
    from training.masks import bidirectional_mask

    retrieval = model.retrieval
    device = next(model.parameters()).device
    num_queries = model.num_query_tokens
    image_embeds, image_feats = itc_image_features(model, processor, image_paths, s.batch_size, s.progress)
    tokens = text_tokens(processor.tokenizer, texts, s.max_text_length).to(device)
    itc = itc_similarity(image_feats, itc_text_features(model, tokens, s.batch_size))

    def itm(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, len(image_index), s.batch_size):
            i, t = image_index[start : start + s.batch_size], text_index[start : start + s.batch_size]
            hidden = qformer_pass(
                model,
                image_embeds[i],
                tokens["input_ids"][t],
                tokens["attention_mask"][t],
                bidirectional_mask,
            )
            scores.append(retrieval.itm_head(hidden[:, :num_queries]).mean(dim=1)[:, 1])
        return torch.cat(scores)

    final = {}
    for name, sims in (("i2t", itc), ("t2i", itc.T)):
        k = min(s.k_test, sims.shape[1])
        top = sims.topk(k, dim=1).indices
        rows = torch.arange(sims.shape[0], device=device)[:, None].expand(-1, k)
        scores = torch.full_like(sims, -100.0)
        pairs = (rows.reshape(-1), top.reshape(-1))
        image_index, text_index = pairs if name == "i2t" else pairs[::-1]
        matched = []
        for start in _bar(
            range(0, len(image_index), s.batch_size * 8), s.progress, f"ITM re-rank {name} (k={k})"
        ):
            end = start + s.batch_size * 8
            matched.append(itm(image_index[start:end], text_index[start:end]))
        scores[pairs] = torch.cat(matched) + sims[pairs]
        final[name] = scores
    return {"itc_i2t": itc, "itc_t2i": itc.T, "i2t": final["i2t"], "t2i": final["t2i"]}


def evaluate_retrieval(s: EvalSettings, rows: list[dict]) -> tuple[dict, list[dict]]:
    from transformers import AutoProcessor

    from training.model import Stage1Model

    device = _device(s.device)
    model = Stage1Model.from_pretrained(s.model).to(device).eval()
    processor = AutoProcessor.from_pretrained(s.model)
    text_image, first_rows = group_by_image(rows)
    image_paths = [row["image"] for row in first_rows]
    scores = retrieval_scores(model, processor, image_paths, [r["text"] for r in rows], s)
    text_caption = caption_ids([r["text"] for r in rows]) if s.same_caption_positives else None
    metrics = retrieval_recall(
        scores["i2t"].cpu(), scores["t2i"].cpu(), text_image, text_caption=text_caption
    )
    metrics["itc_only"] = retrieval_recall(
        scores["itc_i2t"].cpu(), scores["itc_t2i"].cpu(), text_image, text_caption=text_caption
    )
    metrics |= {"images": len(image_paths), "texts": len(rows), "k_test": s.k_test}
    metrics["same_caption_positives"] = s.same_caption_positives
    top = scores["i2t"].argmax(dim=1).tolist()
    predictions = [{"image": image_paths[i], "best_text": rows[t]["text"]} for i, t in enumerate(top)]
    return metrics, predictions


EVALUATORS = {"vqa": evaluate_vqa, "caption": evaluate_caption, "retrieval": evaluate_retrieval}


def print_table(task: str, metrics: dict) -> None:
    lines = [f"{'metric':<28} {'value':>10}", "-" * 39]
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"{key:<28} {value:>10.2f}")
    for key, value in metrics.get("per_type", {}).items():
        lines.append(f"{'  ' + key + ' accuracy':<28} {value['accuracy']:>10.2f}  (n={value['count']})")
    for key, value in metrics.get("itc_only", {}).items():
        lines.append(f"{'  itc only ' + key:<28} {value:>10.2f}")
    print(f"eval {task}\n" + "\n".join(lines), flush=True)


def _unreadable_images(rows: list[dict]) -> list[str]:
    """The manifest's images that cannot be read: they stay in the evaluation (as wrong answers, or as blank
    images in retrieval) so that figures stay comparable, and are counted in the metrics and named here."""
    paths = list(dict.fromkeys(row["image"] for row in rows))
    unreadable = [path for path in paths if image_problem(path) is not None]
    if unreadable:
        log.warning(
            "%d of %d images cannot be read and count as misses: %s",
            len(unreadable), len(paths), ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""),
        )  # fmt: skip
    return unreadable


def run_eval(s: EvalSettings) -> dict:
    if s.task not in EVALUATORS:
        raise SystemExit(f"--task must be one of {', '.join(EVALUATORS)}")
    if not s.model or not s.manifest:
        raise SystemExit("eval needs --model and --manifest")
    if s.vqa_scoring not in VQA_SCORING:
        raise SystemExit(f"--vqa-scoring must be one of {', '.join(VQA_SCORING)}")
    rows = _rows(s)
    unreadable = _unreadable_images(rows)
    metrics, predictions = EVALUATORS[s.task](s, rows)
    metrics = {"task": s.task, "model": s.model, "manifest": s.manifest, **metrics}
    metrics["unreadable_images"] = len(unreadable)
    output = Path(s.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_jsonl(output / "predictions.jsonl", predictions)
    print_table(s.task, metrics)
    print(json.dumps({"summary": {"metrics": str(output / "metrics.json")}}), flush=True)
    return metrics
