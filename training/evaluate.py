"""`blip2-train eval --task vqa|caption|retrieval`: the paper's evaluation protocols, batched.

Generation (vqa, caption) goes through the checkpoint's own processor and `generate()`, exactly as a
user of plain transformers would run it (BLIP-2 or InstructBLIP folders alike; `training.inference`).
Retrieval follows LAVIS: ITC similarity for all image-text pairs, the top k candidates of each query
re-ranked by ITM, final score ITM logit + ITC similarity (`training.scoring`, on the core's
`blip2.scores`). Each run writes `<output>/metrics.json` and `<output>/predictions.jsonl` and prints a
table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from blip2.prompts import GENERATION_DEFAULTS, resolve_prompt
from blip2.text import MODES as TEXT_PROCESSING_MODES
from blip2.text import TextProcessing, load_text_processing, resolve_text_processing
from training.data import caption_ids, group_by_image, image_problem, read_manifest, write_jsonl
from training.inference import generate_texts, load_generation_model, pick_device
from training.metrics import VQA_SCORING, caption_metrics, retrieval_recall, vqa_metrics
from training.scoring import retrieval_scores
from training.settings import EvalSettings

log = logging.getLogger(__name__)


def _options(s: EvalSettings) -> dict:
    defaults = GENERATION_DEFAULTS[s.task]  # the beam width comes from --num-beams (its default: the paper's)
    options = {k: defaults[k] if getattr(s, k) is None else getattr(s, k) for k in defaults}
    return options | {"do_sample": False}


def _generate(s: EvalSettings, model, processor, paths, prompts, options) -> list[str]:
    return generate_texts(model, processor, paths, prompts, s.batch_size, s.progress, **options)


def _text_processing(s: EvalSettings) -> TextProcessing | None:
    """What questions and texts go through: the model folder's record, as `--text-processing` resolves it."""
    try:
        return resolve_text_processing(s.text_processing, load_text_processing(s.model))
    except ValueError as error:
        raise SystemExit(str(error)) from None


def _rows(s: EvalSettings) -> list[dict]:
    rows = read_manifest(s.manifest)
    return rows[: s.limit] if s.limit > 0 else rows


def evaluate_vqa(s: EvalSettings, rows: list[dict]) -> tuple[dict, list[dict]]:
    model, processor = load_generation_model(s.model, pick_device(s.device))
    template = resolve_prompt("vqa", s.prompt)
    text_processing = _text_processing(s)
    questions = [row["question"] for row in rows]
    if text_processing is not None:
        questions = [text_processing.question(q) for q in questions]
    prompts = [template.format(q) for q in questions]
    options = _options(s)
    answers = _generate(s, model, processor, [r["image"] for r in rows], prompts, options)
    metrics = vqa_metrics(answers, rows, scoring=s.vqa_scoring) | {
        "generation": options | {"prompt": template},
        "text_processing": _recorded(text_processing),
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
    model, processor = load_generation_model(s.model, pick_device(s.device))
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


def evaluate_retrieval(s: EvalSettings, rows: list[dict]) -> tuple[dict, list[dict]]:
    from transformers import AutoProcessor

    from training.model import Stage1Model

    device = pick_device(s.device)
    model = Stage1Model.from_pretrained(s.model).to(device).eval()
    processor = AutoProcessor.from_pretrained(s.model)
    text_image, first_rows = group_by_image(rows)
    image_paths = [row["image"] for row in first_rows]
    text_processing = _text_processing(s)
    texts = [r["text"] for r in rows]
    if text_processing is not None:  # as LAVIS's retrieval datasets pass their captions
        texts = [text_processing.caption(text) for text in texts]
    scores = retrieval_scores(
        model, processor, image_paths, texts,
        batch_size=s.batch_size, max_text_length=s.max_text_length, k_test=s.k_test, progress=s.progress,
    )  # fmt: skip
    text_caption = caption_ids(texts) if s.same_caption_positives else None
    metrics = retrieval_recall(
        scores["i2t"].cpu(), scores["t2i"].cpu(), text_image, text_caption=text_caption
    )
    metrics["itc_only"] = retrieval_recall(
        scores["itc_i2t"].cpu(), scores["itc_t2i"].cpu(), text_image, text_caption=text_caption
    )
    metrics |= {"images": len(image_paths), "texts": len(rows), "k_test": s.k_test}
    metrics["same_caption_positives"] = s.same_caption_positives
    metrics["text_processing"] = _recorded(text_processing)
    top = scores["i2t"].argmax(dim=1).tolist()
    predictions = [{"image": image_paths[i], "best_text": rows[t]["text"]} for i, t in enumerate(top)]
    return metrics, predictions


def _recorded(text_processing: TextProcessing | None) -> dict | None:
    """The text processing a figure was measured with, for metrics.json (None: text as it came)."""
    return None if text_processing is None else text_processing.to_json()


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
    if s.text_processing not in TEXT_PROCESSING_MODES:
        raise SystemExit(f"--text-processing must be one of {', '.join(TEXT_PROCESSING_MODES)}")
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
