"""Request and response bodies. Bounds that depend on settings are checked in routes.py."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

IMAGE_DOC = "The image: base64, a `data:image/...;base64,` URI, or an http(s) URL on an allow-listed host."
RELEVANCE_DOC = (
    "One number that orders the results, higher is better; they come sorted by it. For a result the ITM "
    "re-ranked (`score` set: the best `top_k` by ITC): 1 + sigmoid(`score`), in (1, 2), so LAVIS's order "
    "among them is kept and they come before the rest; for any other result: its ITC cosine (`itc_score`), "
    "in [-1, 1]."
)


def relevance(score: float | None, itc_score: float) -> float:
    """A result's relevance (RELEVANCE_DOC): 1 + sigmoid(LAVIS's ITM + ITC score) for an ITM-re-ranked
    result, above every result ranked by ITC alone, whose relevance is its ITC cosine."""
    if score is None:
        return itc_score
    return 1 + 0.5 * (1 + math.tanh(score / 2))  # 1 + sigmoid(score), without overflow for any score


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationParams(Strict):
    """Generation options; unset ones take the route's defaults. Bounded by the server's settings."""

    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    min_new_tokens: int | None = Field(None, ge=0, description="Fewest tokens to generate.")
    num_beams: int | None = Field(None, ge=1, description="Beam width (1 = greedy or sampling).")
    do_sample: bool = Field(False, description="Sample instead of searching.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.0, ge=0.5, le=5, description="Above 1 discourages repeated tokens.")
    length_penalty: float | None = Field(
        None, ge=-5, le=5, description="Beam length penalty; < 0 favours short answers."
    )


class CaptionRequest(GenerationParams):
    image: str | None = Field(None, description=IMAGE_DOC + " In multipart: the file part `image`.")
    prompt: str | None = Field(None, description="Text the caption continues (default per model, e.g. none).")


class VqaRequest(GenerationParams):
    image: str | None = Field(None, description=IMAGE_DOC + " In multipart: the file part `image`.")
    question: str = Field(..., min_length=1, description="The question about the image.")
    prompt_template: str | None = Field(
        None, description="Template with `{}` for the question (default per model)."
    )


class GenerateRequest(GenerationParams):
    image: str | None = Field(None, description=IMAGE_DOC + " In multipart: the file part `image`.")
    prompt: str = Field(
        "",
        description="The free prompt, passed to the LLM after the image's query tokens (through the model's "
        "text processing, see BLIP2_TEXT_PROCESSING).",
    )


class EmbedRequest(Strict):
    images: list[str] = Field(
        default_factory=list, description="Images (" + IMAGE_DOC + ") Multipart: file parts `images`."
    )
    texts: list[str] = Field(default_factory=list, description="Texts to embed.")
    return_query_embeddings: bool = Field(False, description="Also return every query vector of each image.")


class RetrieveRequest(Strict):
    text: str | None = Field(None, description="A text query (ranks `images`).")
    image: str | None = Field(None, description="An image query (ranks `texts`). " + IMAGE_DOC)
    texts: list[str] | None = Field(None, description="Candidate texts, for an image query.")
    images: list[str] | None = Field(None, description="Candidate images, for a text query.")
    top_k: int | None = Field(None, ge=1, description="How many of the best ITC candidates ITM re-ranks.")


class ErrorDetail(BaseModel):
    type: str = Field(..., description="The error's kind, as in an error answer's `error.type`.")
    message: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CaptionResponse(BaseModel):
    model: str
    caption: str
    usage: Usage


class VqaResponse(BaseModel):
    model: str
    answer: str
    usage: Usage


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class EmbedResponse(BaseModel):
    model: str
    dim: int
    image_embeddings: list[list[float]] = Field(
        default_factory=list, description="One L2-normalised vector per image."
    )
    text_embeddings: list[list[float]] = Field(
        default_factory=list, description="One L2-normalised vector per text."
    )
    image_query_embeddings: list[list[list[float]]] | None = Field(
        None, description="Per image, every query's L2-normalised vector (what ITC compares)."
    )


class RetrieveResult(BaseModel):
    index: int = Field(..., description="Position of the candidate in the request.")
    score: float | None = Field(
        None,
        description="ITM logit + ITC similarity (LAVIS's ranking), for the `top_k` re-ranked only (null for "
        "the others).",
    )
    itc_score: float = Field(..., description="Contrastive similarity: cosine, max over the queries.")
    itm_score: float | None = Field(
        None,
        description="Image-text matching probability, for the `top_k` re-ranked only (null for the others).",
    )

    @computed_field(description=RELEVANCE_DOC)
    @property
    def relevance(self) -> float:
        return relevance(self.score, self.itc_score)


class RetrieveResponse(BaseModel):
    model: str
    results: list[RetrieveResult]


# -- OpenAI-compatible chat -------------------------------------------------------------------------
class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, seed, ...)
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")
    stream: bool = False
    stop: str | list[str] | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
