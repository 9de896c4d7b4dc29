"""Text as a BLIP-2 model was trained to read it, and its record in a model folder.

LAVIS, whose recipe trained every released BLIP-2, passes each caption and question through a text
processor before the model sees it (`BlipCaptionProcessor`, `BlipQuestionProcessor`): lower case, a set of
punctuation removed, runs of spaces made one, at most a number of words. A model trained that way has only
ever read such text: `What color is the shape?` is, to it, a question it never saw. `TextProcessing` does
the same to a person's text before it is tokenised, the training CLI records the one it trained with in
the model folder (`text_processing.json`), and the server applies the folder's record. A folder without
the record (a released Salesforce checkpoint) has its text left as it comes.

One departure from LAVIS, for questions only and recorded in the file: with `question_mark: "one"` the
question's trailing question marks (none, one or several) become exactly one, the form in which VQA
training data (VQAv2, easy-VQA) asks every question.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

RECORD_FILE = "text_processing.json"
# The characters LAVIS's BLIP text processors take out of captions and questions.
LAVIS_PUNCTUATION = '.!"()*#:;~'
MODES = ("auto", "on", "off")
QUESTION_MARKS = ("keep", "one")

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class TextProcessing:
    """One model's text processing; `caption()` for captions, prompts and search texts, `question()` for
    VQA questions."""

    lowercase: bool = True
    remove: str = LAVIS_PUNCTUATION  # characters taken out
    max_words: int = 50  # LAVIS's default for both processors
    question_mark: Literal["keep", "one"] = "one"

    def __post_init__(self) -> None:
        if self.max_words < 1:
            raise ValueError(f"max_words must be at least 1, not {self.max_words}")
        if self.question_mark not in QUESTION_MARKS:
            raise ValueError(f"question_mark must be one of {', '.join(QUESTION_MARKS)}")

    def _common(self, text: str, replacement: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.remove:
            text = text.translate({ord(c): replacement for c in self.remove})
        words = _SPACES.split(text.strip())
        return " ".join(words[: self.max_words])

    def caption(self, text: str) -> str:
        """A caption, a prompt or a search text: removed characters leave a space (as in LAVIS's caption
        processor, so `red.blue` stays two words)."""
        return self._common(text, " ")

    def question(self, text: str) -> str:
        """A VQA question: removed characters leave nothing (as in LAVIS's question processor), and with
        `question_mark` "one" the question ends with exactly one `?`."""
        text = self._common(text, "")
        if self.question_mark == "one":
            text = text.rstrip("? ")
            text = text + "?" if text else text
        return text

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, where: str = RECORD_FILE) -> TextProcessing:
        """The processing a record describes; a record with unknown keys or wrong types is refused (a
        newer format silently misread would serve text the model was not trained on)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        kinds = {"lowercase": bool, "remove": str, "max_words": int, "question_mark": str}
        for key, value in data.items():
            if not isinstance(value, kinds[key]) or (kinds[key] is int and isinstance(value, bool)):
                raise ValueError(f"{where}: {key} must be a {kinds[key].__name__}, not {value!r}")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def load_text_processing(folder: str | Path) -> TextProcessing | None:
    """The processing a model folder records, or None when it records none (text is served as it comes)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    return TextProcessing.from_json(data, str(path))


def save_text_processing(folder: str | Path, processing: TextProcessing | None) -> None:
    """Record the processing a model was trained with in its folder; None records that there was none
    (the file is removed, so a folder written over an old one never keeps a stale record)."""
    path = Path(folder) / RECORD_FILE
    if processing is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(processing.to_json(), indent=2) + "\n")


def resolve_text_processing(mode: str, recorded: TextProcessing | None) -> TextProcessing | None:
    """What to apply for a setting `auto | on | off`: auto is the folder's record (none: text as it
    comes), on is the record or, without one, LAVIS's processing, off is nothing."""
    if mode not in MODES:
        raise ValueError(f"text processing must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return None
    if mode == "on":
        return recorded or TextProcessing()
    return recorded
