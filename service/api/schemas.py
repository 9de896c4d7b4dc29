"""Request and response bodies. Bounds that depend on settings are checked in routes.py."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, computed_field, model_validator

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


def integral_floats_as_ints(value: Any) -> Any:
    """JSON's numbers as JSON Schema reads them: 2.0 and 1e30 are integers (a strict model would refuse 2.0 for
    `int`, and a bound on integers, such as the gallery's 64 bits, would let 1e30 through)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_floats_as_ints(item) for item in value]
    return value


class Typed(BaseModel):
    """A request body held to the types the document states: no "3" for 3, no 1 for true (pydantic's lax mode
    took both, so the server accepted what its document refuses); 2.0 is still an integer, as in JSON Schema."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_numbers(cls, data: Any) -> Any:
        try:
            return integral_floats_as_ints(data)
        except RecursionError:  # nesting deeper than Python's stack: a client's mistake (422), never a 500
            raise ValueError("the body is nested too deep") from None


class Strict(Typed):
    model_config = ConfigDict(extra="forbid", strict=True)


def required(*names: str, **keywords: Any) -> ConfigDict:
    """A request model that the document says needs `names` (and `keywords`, e.g. oneOf), while the model
    itself leaves them optional: from multipart they come as file parts, which service.api.deps reads apart."""
    return ConfigDict(extra="forbid", strict=True, json_schema_extra={"required": list(names), **keywords})


# An image as a string field. Required ones are never null in the document; optional ones may be (unset).
IMAGE_STRING = {"type": "string", "format": "image"}
ImageString = Annotated[str | None, WithJsonSchema(IMAGE_STRING)]
OptionalImage = Annotated[str | None, WithJsonSchema({"anyOf": [IMAGE_STRING, {"type": "null"}]})]
OptionalImages = Annotated[
    list[str] | None,
    WithJsonSchema({"anyOf": [{"type": "array", "items": IMAGE_STRING}, {"type": "null"}]}),
]


def present(name: str) -> dict[str, Any]:
    """A schema: the string field `name` is given (not absent, not null)."""
    return {"required": [name], "properties": {name: {"type": "string"}}}


def when(condition: dict[str, Any], then: dict[str, Any], otherwise: dict[str, Any] | None = None) -> dict:
    """if/then/else: how the document ties fields together (client generators read no oneOf of bare parts)."""
    return {"if": condition, "then": then} | ({"else": otherwise} if otherwise else {})


def unset(text: str, items: str) -> dict[str, Any]:
    """Schemas for properties: the string `text` absent or null, the list `items` absent, null or empty."""
    return {text: {"type": "null"}, items: {"type": ["array", "null"], "maxItems": 0}}


def non_empty(name: str) -> dict[str, Any]:
    """A schema: the list field `name` holds at least one item."""
    return {"required": [name], "properties": {name: {"type": "array", "minItems": 1}}}


# Exactly one `{}`: runs of `{` never followed by `}`, then `{}`, then the same again.
NO_SLOT = r"(?:[^{]|\{+[^{}])*\{*"
ONE_SLOT_PATTERN = f"^(?:{NO_SLOT}\\{{\\}}{NO_SLOT})?$"  # or empty: the default template


class GenerationParams(Strict):
    """Generation options; unset ones take the route's defaults. Bounded by the server's settings."""

    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    min_new_tokens: int | None = Field(None, ge=0, description="Fewest tokens to generate.")
    num_beams: int | None = Field(None, ge=1, description="Beam width (1 = greedy or sampling).")
    do_sample: bool = Field(False, description="Sample instead of searching.")
    # from 0.01: a temperature near 0 overflows the scaled logits (1e-300 made a 500); greedy is its limit
    temperature: float = Field(1.0, ge=0.01, le=5, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.0, ge=0.5, le=5, description="Above 1 discourages repeated tokens.")
    length_penalty: float | None = Field(
        None, ge=-5, le=5, description="Beam length penalty; < 0 favours short answers."
    )


def image_field() -> Any:
    return Field(None, description=IMAGE_DOC + " In multipart: the file part `image`.")


class CaptionRequest(GenerationParams):
    model_config = required("image")
    image: ImageString = image_field()
    prompt: str | None = Field(None, description="Text the caption continues (default per model, e.g. none).")


class VqaRequest(GenerationParams):
    model_config = required("image", "question")
    image: ImageString = image_field()
    question: str = Field(..., min_length=1, description="The question about the image.")
    prompt_template: str | None = Field(
        None,
        description="Template with exactly one `{}` for the question (empty or absent: the model's default).",
        json_schema_extra={"pattern": ONE_SLOT_PATTERN},
    )


class GenerateRequest(GenerationParams):
    model_config = required("image")
    image: ImageString = image_field()
    prompt: str = Field(
        "",
        description="The free prompt, passed to the LLM after the image's query tokens (through the model's "
        "text processing, see BLIP2_TEXT_PROCESSING).",
    )


class EmbedRequest(Strict):
    model_config = required(**when({"not": non_empty("images")}, then=non_empty("texts")))
    images: Annotated[
        list[str], WithJsonSchema({"type": "array", "items": {"type": "string", "format": "image"}})
    ] = Field(default_factory=list, description="Images (" + IMAGE_DOC + ") Multipart: file parts `images`.")
    texts: list[str] = Field(default_factory=list, description="Texts to embed.")
    return_query_embeddings: bool = Field(False, description="Also return every query vector of each image.")


class RetrieveRequest(Strict):
    # Exactly one query, ranking at least one candidate of the other kind (the other two absent, null or empty).
    model_config = required(
        **when(
            present("text"),
            then={
                "required": ["text", "images"],
                "properties": non_empty("images")["properties"] | unset("image", "texts"),
            },
            otherwise={
                "required": ["image", "texts"],
                "properties": present("image")["properties"]
                | non_empty("texts")["properties"]
                | unset("text", "images"),
            },
        )
    )
    text: str | None = Field(None, description="A text query (ranks `images`).")
    image: OptionalImage = Field(None, description="An image query (ranks `texts`). " + IMAGE_DOC)
    texts: list[str] | None = Field(None, description="Candidate texts, for an image query.")
    images: OptionalImages = Field(None, description="Candidate images, for a text query.")
    top_k: int | None = Field(None, ge=1, description="How many of the best ITC candidates ITM re-ranks.")


class ErrorDetail(BaseModel):
    type: str = Field(..., description="The error's kind, as in an error answer's `error.type`.")
    message: str


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"type": ..., "message": ...}}` (service/api/errors.py)."""

    error: ErrorDetail


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
class ImageUrl(Typed):
    url: Annotated[str, WithJsonSchema({"type": "string", "format": "image"})] = Field(
        ..., description="A `data:image/...;base64,` URI, or an http(s) URL on an allow-listed host."
    )
    detail: str | None = None


class ContentPart(Typed):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


def _content_doc(schema: dict[str, Any]) -> None:
    """The document's content: a string or parts, at most one of them an image."""
    for option in schema["anyOf"]:
        if option.get("type") == "array":
            option.update(contains=IMAGE_PART, minContains=0, maxContains=1)


# A content part the server counts as the image: type `image_url` with an `image_url` object.
IMAGE_PART = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {"type": {"const": "image_url"}, "image_url": {"type": "object"}},
}


class ChatMessage(Typed):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(None, json_schema_extra=_content_doc)


class ChatRequest(Typed):
    # OpenAI clients send fields we ignore (user, seed, ...); strict: the fields are what the document types
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        description="The conversation, with exactly one `image_url` part in all. A last turn from the assistant "
        "is continued; without user or assistant turns, the system text is the prompt.",
        json_schema_extra={
            "contains": {
                "type": "object",
                "required": ["content"],
                "properties": {"content": {"type": "array", "contains": IMAGE_PART}},
            },
            "minContains": 1,
            "maxContains": 1,
        },
    )
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
