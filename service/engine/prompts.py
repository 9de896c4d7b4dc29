"""The server's prompts: the default caption prompt and VQA template of the loaded model family (the texts
themselves, and the routes' generation defaults, are the core's: `blip2.prompts`), and `Prompt`, which keeps
a person's text apart from the server's templates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2.prompts import INSTRUCT_CAPTION_PROMPT, VQA_TEMPLATE_DECODER, VQA_TEMPLATE_SHORT
from blip2.text import TextProcessing
from service.engine.loading import GenerationModel
from service.settings import Settings


@dataclass(frozen=True)
class FamilyPrompts:
    """The server's own prompts for the loaded model family."""

    caption: str  # what a caption continues when the client gives no prompt
    vqa_template: str  # a question's template, `{}` where the question goes (/vqa and the chat)


def family_prompts(gen: GenerationModel, settings: Settings) -> FamilyPrompts:
    """The default caption prompt and VQA template for the loaded model family; the settings may override both."""
    instruct = gen.kind == "instructblip"
    caption = (
        settings.caption_prompt
        if settings.caption_prompt is not None
        else (INSTRUCT_CAPTION_PROMPT if instruct else "")
    )
    if settings.vqa_prompt_template is not None:
        return FamilyPrompts(caption, settings.vqa_prompt_template)
    decoder = not gen.is_encoder_decoder and not instruct
    return FamilyPrompts(caption, VQA_TEMPLATE_DECODER if decoder else VQA_TEMPLATE_SHORT)


# The kinds of a person's text in a prompt: a VQA question, or free text (a /caption or /generate prompt, a
# chat's system text and earlier answers), which goes through the model's processing as a caption would.
TextKind = Literal["question", "text"]


@dataclass(frozen=True)
class Prompt:
    """A prompt in pieces: the server's own text (kind None: templates, separators) and a person's texts.

    The runner joins them (`text`) where the prompt is tokenised, each person's text through the model's
    text processing for its kind, so the server's templates are never processed and no route processes
    text itself."""

    pieces: tuple[tuple[TextKind | None, str], ...]

    @classmethod
    def person(cls, text: str, kind: TextKind = "text") -> Prompt:
        return cls(((kind, text),))

    @classmethod
    def question(cls, template: str, question: str) -> Prompt:
        """A VQA prompt: the template (the server's or the client's) with the question at its `{}`."""
        pieces: list[tuple[TextKind | None, str]] = []
        for n, part in enumerate(template.split("{}")):
            if n:
                pieces.append(("question", question))
            pieces.append((None, part))
        return cls(tuple(pieces))

    @classmethod
    def joined(cls, prompts: list[Prompt], separator: str = " ") -> Prompt:
        pieces: list[tuple[TextKind | None, str]] = []
        for n, prompt in enumerate(prompts):
            if n:
                pieces.append((None, separator))
            pieces += prompt.pieces
        return cls(tuple(pieces))

    def text(self, processing: TextProcessing | None = None) -> str:
        """The prompt as the LLM reads it; without processing, as the person typed it."""
        if processing is None:
            return "".join(text for _, text in self.pieces)
        process = {None: str, "question": processing.question, "text": processing.caption}
        return "".join(process[kind](text) for kind, text in self.pieces)
