"""Dataset importers: each turns a public dataset's own files into this project's JSONL manifests.

- VQA manifest line: {"image", "question", "answer", optional "answers" (all human answers),
  "question_type", "question_id", "image_id"}.
- Caption manifest line: {"image", "text", "image_id"}.
Image paths are written relative to the manifest's folder, as `training.data.read_manifest` expects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
_NEGATION = {"not", "no"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _relative(image: str | Path, folder: Path) -> str:
    return os.path.relpath(Path(image).resolve(), folder.resolve())


# --- easy-VQA -----------------------------------------------------------------------------------------


def easy_vqa_question_type(answer: str) -> str:
    """easy-VQA names no question types; its three kinds follow from the answer: shape, color or yes/no."""
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def image_facts(qa: list[tuple[str, str]], colors: set[str]) -> tuple[str | None, str | None]:
    """An image's (colour, shape) from its questions and answers; None where they do not settle it.

    - an answer that is a colour or a shape states it; "what is the blue shape?" also states the colour;
    - a yes/no question about one colour or shape ("is there not a red shape?") states it when its
      statement is true (yes, or no to a negated question) and rules it out when false;
    - what is left when all but one candidate are ruled out is the fact.
    """
    color_options, shape_options = set(colors), set(SHAPES)
    color = shape = None
    for question, answer in qa:
        words = re.findall(r"[a-z]+", question.lower())
        mentioned_color = next((w for w in words if w in colors), None)
        mentioned_shape = next((w for w in words if w in SHAPES), None)
        if answer in colors:
            color = answer
        elif answer in SHAPES:
            shape = answer
            color = mentioned_color or color
        elif answer in YES_NO:
            true = (answer == "yes") != bool(_NEGATION & set(words))
            if mentioned_color:
                color = mentioned_color if true else color
                color_options.discard(mentioned_color) if not true else None
            if mentioned_shape:
                shape = mentioned_shape if true else shape
                shape_options.discard(mentioned_shape) if not true else None
    if color is None and len(color_options) == 1:
        color = next(iter(color_options))
    if shape is None and len(shape_options) == 1:
        shape = next(iter(shape_options))
    return color, shape


def import_easy_vqa(
    output: str | Path, splits: tuple[str, ...] = ("train", "test"), limit_images: int = 0
) -> dict:
    """Copy easy-VQA's images under <output>/images/<split>/ and write, per split, `vqa_<split>.jsonl` and
    `captions_<split>.jsonl` ("a blue circle", from the image's own questions and answers).

    limit_images > 0 keeps the first N image ids of each split (for quick runs and tests).
    """
    import easy_vqa

    output = Path(output)
    answers = easy_vqa.get_answers()
    colors = {a for a in answers if a not in SHAPES and a not in YES_NO}
    summary: dict = {"output": str(output)}
    for split in splits:
        texts, answers_, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        keep = sorted(paths)[:limit_images] if limit_images > 0 else sorted(paths)
        kept = set(keep)
        image_dir = output / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for image_id in keep:
            shutil.copyfile(paths[image_id], image_dir / f"{image_id}.png")
        per_image: dict[int, list[tuple[str, str]]] = {i: [] for i in keep}
        vqa_rows = []
        for number, (question, answer, image_id) in enumerate(zip(texts, answers_, image_ids, strict=True)):
            if image_id not in kept:
                continue
            per_image[image_id].append((question, answer))
            vqa_rows.append({
                "image": _relative(image_dir / f"{image_id}.png", output), "question": question, "answer": answer,
                "question_type": easy_vqa_question_type(answer), "question_id": number, "image_id": image_id,
            })  # fmt: skip
        caption_rows, unresolved = [], 0
        for image_id in keep:
            color, shape = image_facts(per_image[image_id], colors)
            if color is None and shape is None:
                unresolved += 1
                continue
            text = f"a {color or ''} {shape or 'shape'}".replace("  ", " ")
            caption_rows.append(
                {
                    "image": _relative(image_dir / f"{image_id}.png", output),
                    "text": text,
                    "image_id": image_id,
                }
            )
        write_jsonl(output / f"vqa_{split}.jsonl", vqa_rows)
        write_jsonl(output / f"captions_{split}.jsonl", caption_rows)
        complete = sum(1 for r in caption_rows if "shape" not in r["text"] and len(r["text"].split()) == 3)
        summary[split] = {
            "images": len(keep), "questions": len(vqa_rows), "captions": len(caption_rows),
            "captions_with_colour_and_shape": complete, "images_without_caption": unresolved,
        }  # fmt: skip
    return summary


# --- COCO captions (Karpathy split) ------------------------------------------------------------------


def import_coco_karpathy(karpathy_json: str | Path, images_root: str | Path, output: str | Path) -> dict:
    """`dataset_coco.json` (Karpathy split) -> captions_{train,val,test}.jsonl; restval joins train."""
    data = json.loads(Path(karpathy_json).read_text())
    output, images_root = Path(output), Path(images_root)
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for image in data["images"]:
        split = "train" if image["split"] in ("train", "restval") else image["split"]
        path = images_root / image.get("filepath", "") / image["filename"]
        image_id = image.get("cocoid", image.get("imgid"))
        for sentence in image["sentences"]:
            text = sentence.get("raw") or " ".join(sentence["tokens"])
            rows[split].append({"image": _relative(path, output), "text": text.strip(), "image_id": image_id})
    for split, split_rows in rows.items():
        write_jsonl(output / f"captions_{split}.jsonl", split_rows)
    return {split: len(split_rows) for split, split_rows in rows.items()} | {"output": str(output)}


# --- VQAv2 ---------------------------------------------------------------------------------------------


def import_vqav2(
    questions_json: str | Path,
    images_root: str | Path,
    output_manifest: str | Path,
    annotations_json: str | Path | None = None,
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg",
) -> dict:
    """VQAv2 questions (+ annotations where the split has them) -> one VQA manifest.

    `answer` is the annotators' `multiple_choice_answer`, `answers` all ten human answers, and
    `question_type` the annotation's `answer_type` (yes/no, number, other).
    """
    questions = json.loads(Path(questions_json).read_text())
    subtype = questions.get("data_subtype", "")
    annotations = {}
    if annotations_json:
        annotations = {
            a["question_id"]: a for a in json.loads(Path(annotations_json).read_text())["annotations"]
        }
    output_manifest = Path(output_manifest)
    rows = []
    for q in questions["questions"]:
        image = Path(images_root) / image_pattern.format(subtype=subtype, image_id=q["image_id"])
        row = {"image": _relative(image, output_manifest.parent), "question": q["question"]}
        row |= {"question_id": q["question_id"], "image_id": q["image_id"]}
        annotation = annotations.get(q["question_id"])
        if annotation is not None:
            answers = [a["answer"] for a in annotation["answers"]]
            row["answer"] = annotation.get("multiple_choice_answer") or Counter(answers).most_common(1)[0][0]
            row["answers"] = answers
            row["question_type"] = annotation.get("answer_type", annotation.get("question_type"))
        rows.append(row)
    write_jsonl(output_manifest, rows)
    return {
        "questions": len(rows),
        "with_answers": sum("answers" in r for r in rows),
        "output": str(output_manifest),
    }
