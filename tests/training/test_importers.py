"""The importers write manifests the training code reads; easy-VQA captions come from each image's facts."""

from __future__ import annotations

import json

from training.data import read_manifest
from training.importers import image_facts, import_coco_karpathy, import_easy_vqa, import_vqav2

COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


def test_image_facts_from_questions_and_answers():
    qa = [("what is the blue shape?", "rectangle"), ("is there not a red shape?", "yes")]
    assert image_facts(qa, COLORS) == ("blue", "rectangle")
    # ruled out by negated yes/no answers: not a circle, not a triangle -> rectangle
    qa = [("does the image contain a circle?", "no"), ("is there not a triangle?", "yes")]
    assert image_facts(qa, COLORS) == (None, "rectangle")


def test_easy_vqa_import(tmp_path):
    summary = import_easy_vqa(tmp_path, ("test",), limit_images=20)
    assert summary["test"]["images"] == 20
    rows = read_manifest(tmp_path / "vqa_test.jsonl")
    assert {r["question_type"] for r in rows} == {"shape", "color", "yes/no"}
    assert all(r["answer"] for r in rows) and all(r["image"].endswith(".png") for r in rows)
    captions = read_manifest(tmp_path / "captions_test.jsonl")
    by_image = {r["image_id"]: r["text"] for r in captions}
    for row in rows:  # every colour / shape answer about an image agrees with its caption
        if row["question_type"] in ("color", "shape") and row["image_id"] in by_image:
            assert row["answer"] in by_image[row["image_id"]].split() or row["question"].startswith(
                "what is the"
            )


def test_coco_and_vqav2_importers(tmp_path):
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 1, "split": "test", "sentences": [{"raw": "A cat. "}, {"raw": "a pet"}]},
        {"filepath": "train2014", "filename": "b.jpg", "cocoid": 2, "split": "restval", "sentences": [{"tokens": ["a", "dog"]}]},
    ]}  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert import_coco_karpathy(tmp_path / "k.json", tmp_path / "coco", tmp_path / "out")["test"] == 2
    train = read_manifest(tmp_path / "out" / "captions_train.jsonl")
    assert train[0]["text"] == "a dog" and train[0]["image"].endswith("train2014/b.jpg")
    questions = {
        "data_subtype": "val2014",
        "questions": [{"question": "what?", "question_id": 7, "image_id": 42}],
    }
    annotations = {"annotations": [{"question_id": 7, "multiple_choice_answer": "two", "answer_type": "number",
                                    "answers": [{"answer": "two"}] * 9 + [{"answer": "2"}]}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    import_vqav2(tmp_path / "q.json", tmp_path / "img", tmp_path / "vqa.jsonl", tmp_path / "a.json")
    row = read_manifest(tmp_path / "vqa.jsonl")[0]
    assert row["answer"] == "two" and len(row["answers"]) == 10 and row["question_type"] == "number"
    assert row["image"].endswith("COCO_val2014_000000000042.jpg")
