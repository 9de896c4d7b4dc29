"""blip2.text: LAVIS's BLIP text processing (lower case, its punctuation removed, spaces collapsed, a word
cap), the question-mark rule, and the record a model folder keeps of it."""

from __future__ import annotations

import json

import pytest

from blip2.text import (
    LAVIS_PUNCTUATION,
    RECORD_FILE,
    TextProcessing,
    load_text_processing,
    resolve_text_processing,
    save_text_processing,
)


def test_question_is_lower_case_without_lavis_punctuation_and_ends_with_one_mark():
    processing = TextProcessing()
    assert processing.question("What color is the shape?") == "what color is the shape?"
    assert processing.question("  What  (exactly) is: THIS shape  ") == "what exactly is this shape?"
    for typed in ("what color is the shape", "what color is the shape??", "what color is the shape ? ?"):
        assert processing.question(typed) == "what color is the shape?"
    # LAVIS's question processor removes its punctuation without a space in its place
    assert processing.question("is it red.blue?") == "is it redblue?"
    assert processing.question("") == "" and processing.question("?!") == ""


def test_question_marks_kept_as_typed_when_the_record_says_keep():
    keep = TextProcessing(question_mark="keep")
    assert keep.question("Is It Red??") == "is it red??"
    assert keep.question("is it red") == "is it red"


def test_caption_is_processed_as_lavis_caption_processor():
    processing = TextProcessing()
    assert processing.caption("A RED Circle.") == "a red circle"
    # removed characters leave a space (then collapsed), question marks are not LAVIS's to remove
    assert processing.caption('a "red"circle; on~blue (sky)!\n') == "a red circle on blue sky"
    assert processing.caption("what is it?") == "what is it?"
    assert set(LAVIS_PUNCTUATION) == set('.!"()*#:;~')


def test_word_cap():
    processing = TextProcessing(max_words=3)
    assert processing.caption("one two three four five") == "one two three"
    assert processing.question("one two three four five?") == "one two three?"
    with pytest.raises(ValueError, match="max_words"):
        TextProcessing(max_words=0)


def test_record_round_trip_and_absence(tmp_path):
    assert load_text_processing(tmp_path) is None
    processing = TextProcessing(max_words=30, question_mark="keep")
    save_text_processing(tmp_path, processing)
    assert json.loads((tmp_path / RECORD_FILE).read_text())["max_words"] == 30
    assert load_text_processing(tmp_path) == processing
    save_text_processing(tmp_path, None)  # a run without processing leaves no stale record
    assert not (tmp_path / RECORD_FILE).exists() and load_text_processing(tmp_path) is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("not json", "unreadable"),
        ("[1]", "JSON object"),
        ('{"lowercase": true, "stem": true}', "unknown keys"),
        ('{"max_words": "50"}', "max_words must be a int"),
        ('{"lowercase": 1}', "lowercase must be a bool"),
        ('{"question_mark": "two"}', "question_mark must be one of"),
    ],
)
def test_a_bad_record_is_refused_with_its_path(tmp_path, record, message):
    (tmp_path / RECORD_FILE).write_text(record)
    with pytest.raises(ValueError, match=message) as caught:
        load_text_processing(tmp_path)
    assert RECORD_FILE in str(caught.value)


def test_resolve_auto_on_off():
    recorded = TextProcessing(max_words=20)
    assert resolve_text_processing("auto", recorded) == recorded
    assert resolve_text_processing("auto", None) is None
    assert resolve_text_processing("on", recorded) == recorded
    assert resolve_text_processing("on", None) == TextProcessing()
    assert resolve_text_processing("off", recorded) is None
    with pytest.raises(ValueError, match="auto, on, off"):
        resolve_text_processing("yes", recorded)
