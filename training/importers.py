"""Dataset importers: each turns a public dataset's own files into this project's JSONL manifests.

- VQA manifest line: {"image", "question", "answer", optional "answers" (all human answers),
  "question_type", "question_id", "image_id"}.
- Caption manifest line: {"image", "text", "image_id"}.
Image paths are written relative to the manifest's folder, as `training.data.read_manifest` expects.
`write_webdataset_shards` goes the other way: a manifest to WebDataset tar shards for `--shards`.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from training.data import SHARD_IMAGE_KEYS, image_problem, read_manifest, write_jsonl

log = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
_NEGATION = {"not", "no"}


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


# --- WebDataset shards ---------------------------------------------------------------------------------

SHARD_NAME = "shard-{:06d}.tar"


def write_webdataset_shards(manifest: str | Path, output: str | Path, shard_size: int = 1000) -> dict:
    """A manifest's rows as WebDataset shards `<output>/shard-000000.tar`, ... of `shard_size` samples each.

    A sample holds the image file's bytes as they are, under its lower-cased extension (`jpeg` as `jpg`),
    a `.json` with every other field of the row and, where the row has a `text`, a `.txt` with it. A row
    whose image is missing, unreadable or not a jpg/png/webp file is skipped with a warning and counted.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(manifest)
    samples = _shard_samples(rows)
    shards, written = [], 0
    # Each pass takes one sample, then the rest of its shard from the same iterator, until none are left.
    for first in samples:
        path = output / SHARD_NAME.format(len(shards))
        written += _write_tar(path, itertools.chain([first], itertools.islice(samples, shard_size - 1)))
        shards.append(str(path))
        log.info("wrote %s (%d samples so far)", path, written)
    # Shards of an earlier, longer run into this folder would join any `*.tar` glob of the new set.
    for stale in sorted(set(map(str, output.glob(SHARD_NAME.replace("{:06d}", "*")))) - set(shards)):
        log.warning("removing %s: left by an earlier run, not part of this set", stale)
        Path(stale).unlink()
    return {
        "output": str(output), "shards_written": len(shards), "samples": written,
        "skipped": len(rows) - written, "shards": ",".join(shards),
    }  # fmt: skip


def _shard_samples(rows: list[dict]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each row with a usable image."""
    index = 0
    for row in rows:
        image = _image_entry(row["image"])
        if image is None:
            continue
        fields = {k: v for k, v in row.items() if k != "image"}
        members = image | {"json": json.dumps(fields).encode()}
        if isinstance(row.get("text"), str):
            members["txt"] = row["text"].encode()
        # A running number, not the file name: WebDataset splits member names into key and type at a dot.
        yield f"{index:09d}", members
        index += 1


def _image_entry(path: str) -> dict[str, bytes] | None:
    """{extension: the file's bytes}, or None (with a warning) where the file cannot be used."""
    extension = Path(path).suffix.lower().lstrip(".")
    extension = "jpg" if extension == "jpeg" else extension
    if extension not in SHARD_IMAGE_KEYS:
        log.warning("skipping %s: not a %s file", path, "/".join(SHARD_IMAGE_KEYS))
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        log.warning("skipping %s: %s", path, error)
        return None
    problem = image_problem(data)
    if problem is not None:
        log.warning("skipping %s: %s", path, problem)
        return None
    return {extension: data}


def _write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write the samples to `path` and return how many there were.

    The tar is written under a temporary name and renamed when complete, so that a killed run never
    leaves a truncated shard that looks finished.
    """
    partial = path.with_name(path.name + ".partial")
    count = 0
    try:
        with tarfile.open(partial, "w") as tar:
            for key, members in samples:
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return count
