"""The work a route hands the batcher: typed jobs that know their batch key, and what generation returns.

Requests share a model call only when their batch keys are equal: same task and, for generation, the same
settings (beam width or sampling belong to the whole call). A job's images become `pixels` (resized and
normalised for the model that reads them) before the model thread takes it: `Runner.prepare`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from blip2.prompts import GENERATE_DEFAULTS

if TYPE_CHECKING:
    import torch

    from service.engine.prompts import Prompt


@dataclass(frozen=True)
class GenerationOptions:
    """Settings of one generate call; requests share a batch only when these are equal. Unset, plain greedy
    decoding: /generate's defaults."""

    max_new_tokens: int = GENERATE_DEFAULTS["max_new_tokens"]
    min_new_tokens: int = GENERATE_DEFAULTS["min_new_tokens"]
    num_beams: int = GENERATE_DEFAULTS["num_beams"]
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = GENERATE_DEFAULTS["length_penalty"]

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.do_sample:  # transformers warns when sampling knobs come without sampling
            kwargs.pop("temperature"), kwargs.pop("top_p")
        return kwargs


@dataclass
class Generated:
    text: str
    tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens reached)


@dataclass(eq=False)
class GenerateJob:
    image: Image.Image
    prompt: (
        str | Prompt
    )  # a Prompt holds a person's text, which the runner processes (service.engine.prompts)
    options: GenerationOptions
    # Streaming: called on the model thread with each token of this answer as it is generated (up to, not
    # including, its end of sequence). Greedy and sampled decoding only: transformers streams no beams.
    on_token: Callable[[int], None] | None = None
    streamed: list[int] = field(default_factory=list)  # the tokens on_token has had
    pixels: torch.Tensor | None = field(default=None, repr=False)  # (1, 3, H, W): Runner.prepare
    task: ClassVar[str] = "generate"

    @property
    def batch_key(self) -> Hashable:
        return (self.task, self.options)


@dataclass(eq=False)
class EmbedJob:
    images: list[Image.Image]
    texts: list[str]
    query_vectors: bool = False
    pixels: torch.Tensor | None = field(default=None, repr=False)  # (images, 3, H, W): Runner.prepare
    task: ClassVar[str] = "embed"
    batch_key: ClassVar[Hashable] = "embed"


@dataclass(eq=False)
class RetrieveJob:
    query_text: str | None
    query_image: Image.Image | None
    candidate_texts: list[str]
    candidate_images: list[Image.Image]
    top_k: int
    # (1, 3, H, W) of the query image or (candidates, 3, H, W): Runner.prepare
    pixels: torch.Tensor | None = field(default=None, repr=False)
    task: ClassVar[str] = "retrieve"
    batch_key: ClassVar[Hashable] = "retrieve"
