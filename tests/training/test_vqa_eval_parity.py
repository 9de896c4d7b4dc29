"""`training.metrics.vqa_accuracy` / `vqa_metrics` against the official VQAv2 evaluation, per question.

The fixture `data/vqa_eval_reference.json` was written by `make_vqa_eval_reference.py` (beside this
file; its docstring says how to rebuild it), which runs the official `VQAEval.evaluate` (the VQA team's
script as the PyPI wheel salesforce-lavis 1.0.2 ships it, run as it is) on 3,000 seeded random questions
with ten human answers each: case, articles, number words, every contraction spelling of the official
table, each punctuation mark with and without spaces, commas between digits, periods before digits and
elsewhere, more than 32 periods, tabs and newlines; unanimous, nine-to-one and split answers. Nothing is
regenerated here and nothing is fetched.

Every question's accuracy must be the official one exactly (same operations in the same order, so the
floats are equal, not just close), and the overall and per-question-type figures as it rounds them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from training.metrics import vqa_accuracy, vqa_metrics

FIXTURE = Path(__file__).parent / "data" / "vqa_eval_reference.json"


@cache
def _reference() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_covers_the_official_quirks():
    cases = _reference()["cases"]
    assert len(cases) == 3000
    unanimous = [c for c in cases if len(set(c["answers"])) == 1]
    assert 500 < len(unanimous) < 2500
    # where the official arithmetic and normalising both sides disagree: the quirk is exercised
    lenient = sum(vqa_accuracy(c["prediction"], c["answers"], "lenient") != c["accuracy"] for c in cases)
    assert lenient > 500
    assert {c["accuracy"] for c in cases} >= {0.0, 0.3, 0.6, 0.9, 1.0}


def test_accuracy_equals_the_official_script_per_question():
    cases = _reference()["cases"]
    wrong = [
        (c["question_id"], c["prediction"], c["answers"], c["accuracy"], ours)
        for c in cases
        if (ours := vqa_accuracy(c["prediction"], c["answers"])) != c["accuracy"]
    ]
    assert not wrong, (
        f"{len(wrong)} of {len(cases)} differ (id, prediction, answers, official, ours): {wrong[:5]}"
    )


def test_overall_and_per_type_equal_the_official_summary():
    reference = _reference()
    cases = reference["cases"]
    rows = [{"answers": c["answers"], "question_type": c["question_type"]} for c in cases]
    metrics = vqa_metrics([c["prediction"] for c in cases], rows)
    assert metrics["scoring"] == "official"
    assert metrics["count"] == len(cases)
    # the official script reports round(100 * mean, 2)
    assert round(metrics["accuracy"], 2) == reference["overall"]
    per_type = {k: round(v["accuracy"], 2) for k, v in metrics["per_type"].items()}
    assert per_type == reference["per_question_type"]
    assert metrics["accuracy"] == pytest.approx(100 * sum(c["accuracy"] for c in cases) / len(cases))
