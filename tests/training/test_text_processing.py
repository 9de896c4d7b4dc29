"""The training CLI trains on text as LAVIS processes it (blip2.text) and records that processing in every
model folder it writes, so the server reads a person's text the same way; `eval` applies a folder's record.
"""

from __future__ import annotations

import json

import pytest

from blip2.text import RECORD_FILE, TextProcessing, load_text_processing
from service.settings import DEFAULT_MODEL_DIR
from training.cli import main
from training.data import Collator
from training.finetune import PromptCollator

FAST = ["--steps", "1", "--batch-size", "4", "--no-progress", "--log-every", "1", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def vqa_manifest(shapes_manifest, tmp_path_factory):
    """The shapes captions as questions typed with capitals and without `?` (answers: the colour)."""
    rows = [json.loads(line) for line in shapes_manifest.read_text().splitlines()][:8]
    manifest = shapes_manifest.parent / "vqa_typed.jsonl"
    lines = [
        json.dumps({"image": r["image"], "question": "What Colour Is It", "answer": r["text"].split()[1]})
        for r in rows
    ]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_every_trained_model_folder_records_its_text_processing(
    tiny_opt, shapes_manifest, vqa_manifest, tmp_path
):
    data = ["--train-manifest", str(shapes_manifest)]
    runs = {
        "stage1": ["stage1", "--init", str(tiny_opt / "stage1"), *data],
        "stage2": ["stage2", "--init", str(tiny_opt / "generation"), *data],
        "caption": ["finetune", "--task", "caption", "--init", str(tiny_opt / "generation"), *data],
        "vqa": ["finetune", "--task", "vqa", "--init", str(tiny_opt / "generation"),
                "--stage1", str(tiny_opt / "stage1"), "--train-manifest", str(vqa_manifest)],
    }  # fmt: skip
    for name, argv in runs.items():
        main([*argv, *FAST, "--output", str(tmp_path / name)])
        assert load_text_processing(tmp_path / name / "model") == TextProcessing(), name
        assert (
            json.loads((tmp_path / name / "summary.json").read_text())["settings"]["text_processing"] is True
        )
    main([*runs["stage1"], *FAST, "--no-text-processing", "--output", str(tmp_path / "raw")])
    assert not (tmp_path / "raw" / "model" / RECORD_FILE).exists()  # trained on text as it came


def test_collators_process_captions_and_questions_but_not_answers():
    processing = TextProcessing()
    rows = [{"question": "What Colour Is It"}, {"question": "", "prompt": "A short image description:"}]
    samples = [
        {"text": text, "image_id": n, "row": row}
        for n, (text, row) in enumerate(zip(["A RED Circle.", "Blue"], rows, strict=True))
    ]
    captions = Collator(None, text_processing=processing)(samples)
    assert captions.texts == ["a red circle", "blue"]
    assert Collator(None)(samples).texts == ["A RED Circle.", "Blue"]
    vqa = PromptCollator("Question: {} Short answer:", "question", text_processing=processing)(samples)
    # the question is processed, the template and the answer (a target) are not; a row's own template wins
    assert vqa.prompts == ["Question: what colour is it? Short answer:", "A short image description:"]
    assert vqa.texts == [" A RED Circle.", " Blue"]  # the targets, after their prompts


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "generation").is_dir(), reason="no packaged default model")
def test_eval_applies_the_model_folders_record(tmp_path):
    easy_vqa = pytest.importorskip("easy_vqa")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    rows = [
        {"image": paths[i], "question": q[0].upper() + q[1:], "answer": a}
        for q, a, i in zip(questions, answers, image_ids, strict=True)
        if q.startswith("what")
    ][:6]
    manifest = tmp_path / "typed.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures = {}
    for mode in ("auto", "off"):
        main(["eval", "--task", "vqa", "--model", str(DEFAULT_MODEL_DIR / "generation"), "--manifest", str(manifest),
              "--num-beams", "1", "--no-progress", "--text-processing", mode, "--output", str(tmp_path / mode)])  # fmt: skip
        figures[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
    assert figures["auto"]["text_processing"] == TextProcessing().to_json()
    assert figures["off"]["text_processing"] is None
    assert figures["auto"]["exact_match"] == 100.0  # as the lower-case questions it was trained on
    assert figures["off"]["exact_match"] < 50.0  # "What ..." is a question this model never saw
    with pytest.raises(SystemExit, match="--text-processing must be one of"):
        main(
            ["eval", "--task", "vqa", "--model", "m", "--manifest", str(manifest), "--text-processing", "yes"]
        )


def test_recipe_manifest_trains_on_the_same_prompts_and_rewrites_questions(tmp_path):
    """The easy-VQA recipe's fine-tuning rows keep the question apart from the template, so the question
    goes through the text processing and the templates do not: the prompts are the ones the built-in model
    was trained on. `tools.py rewrite` re-types a manifest's questions for the figures in docs/RESULTS.md."""
    from recipes.easy_vqa.tools import rewrite_questions, write_finetune_manifest
    from recipes.easy_vqa.unimodal import CAPTION_PROMPT

    (tmp_path / "vqa_train.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "what color is the shape?", "answer": "red"}) + "\n"
    )
    (tmp_path / "captions_train.jsonl").write_text(
        json.dumps({"image": "a.png", "text": "a red circle"}) + "\n"
    )
    write_finetune_manifest(tmp_path, tmp_path / "finetune.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "finetune.jsonl").read_text().splitlines()]
    samples = [{"text": row["answer"], "image_id": 0, "row": row} for row in rows]
    collate = PromptCollator("Question: {} Short answer:", "question", text_processing=TextProcessing())
    assert collate(samples).prompts == ["Question: what color is the shape? Short answer:", CAPTION_PROMPT]

    rewritten = {}
    for style in ("capital", "no-mark", "double-mark"):
        summary = rewrite_questions(tmp_path / "vqa_train.jsonl", style, tmp_path / f"{style}.jsonl")
        assert summary["rows"] == summary["changed"] == 1
        (row,) = [json.loads(line) for line in (tmp_path / f"{style}.jsonl").read_text().splitlines()]
        assert row["answer"] == "red" and row["image"] == str(tmp_path / "a.png")
        rewritten[style] = row["question"]
    assert rewritten == {
        "capital": "What color is the shape?",
        "no-mark": "what color is the shape",
        "double-mark": "what color is the shape??",
    }
