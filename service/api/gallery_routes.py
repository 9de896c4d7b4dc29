"""The /gallery routes: add images once, search them by text or image, get and delete them.

Embedding goes through the batcher like every route (adds batch with /embed calls and with each other); the
ITM re-rank of a text search's best k reads those images back from disk and runs as one /retrieve job, so its
scores are LAVIS's, as /retrieve's are; a search by image compares mean query vectors (no ITM for image
pairs). Every result has one `relevance` it is sorted by (schemas.RELEVANCE_DOC). An add answers image by
image: what is wrong with one image rejects that image, named, and the rest is stored. Storage calls block
(disk, network), so they run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from PIL import Image
from pydantic import BaseModel, Field, WithJsonSchema, field_validator
from pydantic.json_schema import SkipJsonSchema

from service.api.deps import Parsed, RetrievalRunner, SettingsDep, StateDep, parsed
from service.api.errors import ApiError, refusal, unprocessable
from service.api.images import bytes_from_string, read_upload
from service.api.openapi import (
    BODY,
    GALLERY,
    IMAGE_ID,
    MODEL,
    REF,
    error_responses,
    named_schema,
    request_body,
)
from service.api.schemas import (
    IMAGE_DOC,
    RELEVANCE_DOC,
    ErrorDetail,
    OptionalImage,
    Strict,
    integral_floats_as_ints,
    present,
    relevance,
    required,
    when,
)
from service.api.submit import SubmitDep, Submitter
from service.engine.gallery import (
    MAX_METADATA_BYTES,
    NAME_PATTERN,
    NAME_RULE,
    Gallery,
    NewImage,
    Planned,
    Stored,
    check_filter,
    check_metadata,
    check_name,
)
from service.engine.images import ImageTooLarge, InvalidImage, decode_image
from service.engine.jobs import EmbedJob, RetrieveJob
from service.engine.tasks import check_text
from service.settings import Settings

router = APIRouter(prefix="/gallery", tags=["gallery"])
ID_DOC = f"Your id for the image ({NAME_RULE}). Default: from its content."
METADATA_DOC = (
    f"A JSON object kept with the image (at most {MAX_METADATA_BYTES} bytes); search can filter on it. Its "
    f"keys follow the ids' rule ({NAME_RULE}); its integers fit in 64 bits."
)


# -- bodies ------------------------------------------------------------------------------------------
# The document's metadata object (keys by the ids' rule) and filter (values: a scalar, or a list of them).
# 64-bit integers as the rule reads them (-2^63 <= n < 2^63): a maximum of 2^63 - 1 is no float, and a generator
# rounds it to 2^63
INT64 = {"minimum": -(2**63), "exclusiveMaximum": 2**63}
# Any JSON value whose numbers fit in 64 bits however deep they are (check_metadata's rule). No `type`: each
# keyword bounds the values of its own type (numbers, arrays' items, objects' members).
VALUE_REF = {"$ref": REF.format(model="MetadataValue")}
METADATA_VALUE = named_schema(
    "MetadataValue", INT64 | {"items": VALUE_REF, "additionalProperties": VALUE_REF}
)
METADATA_SCHEMA = {
    "type": "object",
    "propertyNames": {"pattern": NAME_PATTERN},
    "additionalProperties": METADATA_VALUE,
}
# what a filter can match: no control characters in strings, numbers in 64 bits (gallery.literal)
SCALAR = {"type": ["string", "number", "boolean"], "pattern": "^[^\\u0000-\\u001f]*$"} | INT64
FILTER_SCHEMA = {
    "type": "object",
    "propertyNames": {"pattern": NAME_PATTERN},
    "additionalProperties": SCALAR | {"type": [*SCALAR["type"], "array"], "items": SCALAR, "minItems": 1},
}


class GalleryImage(Strict):
    image: Annotated[str, WithJsonSchema({"type": "string", "format": "image"})] = Field(
        ..., description=IMAGE_DOC
    )
    id: Annotated[
        str | None, WithJsonSchema({"anyOf": [{"type": "string", "pattern": NAME_PATTERN}, {"type": "null"}]})
    ] = Field(None, description=ID_DOC)
    metadata: Annotated[dict[str, Any], WithJsonSchema(METADATA_SCHEMA)] = Field(
        default_factory=dict, description=METADATA_DOC
    )

    # What the document states about an id and metadata refuses the request (422), as any field does; what it
    # cannot (bytes that do not decode, an id holding other bytes) rejects that image only, in the answer.
    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return value if value is None else check_name(value, "id")

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(value)


class AddRequest(Strict):
    model_config = required("images")
    images: list[GalleryImage] = Field(
        default_factory=list,
        min_length=0,
        description="JSON: the images to add. Multipart: file parts `images`, with optional `ids` and `metadata` "
        "fields (one per file part, in order: one id, one JSON object).",
        json_schema_extra={"minItems": 1},
    )
    ids: SkipJsonSchema[list[str] | None] = None  # multipart only (the description of `images` says how)
    metadata: SkipJsonSchema[list[str] | None] = None


class Added(BaseModel):
    index: int = Field(..., description="The image's position in the request, from 0.")
    file: str | None = Field(None, description="Multipart: the file part's name, as sent.")
    id: str | None = Field(
        None,
        description="The id the image is stored under (for a duplicate, the image holding these bytes); absent "
        "for a rejected image, which is not stored (its `error` names the id where the id is the reason).",
    )
    status: Literal["added", "exists", "duplicate", "rejected"] = Field(
        ...,
        description="`added`: stored now; `exists`: this id held these bytes already; `duplicate`: these bytes "
        "are stored under `id`; `rejected`: not stored, `error` says why.",
    )
    error: ErrorDetail | None = Field(None, description="Why a rejected image was not stored.")


class AddResponse(BaseModel):
    model: str
    images: list[Added] = Field(
        ...,
        description="One answer per image, in the request's order. Unless every image is rejected (then the "
        "request fails with the first one's error), the good ones are stored and the bad ones rejected.",
    )


class Item(BaseModel):
    id: str
    sha256: str
    added_at: str = Field(..., description="When it was added (ISO 8601, UTC).")
    model: str = Field(..., description="The retrieval model whose vectors the gallery holds.")
    metadata: dict[str, Any]


class SearchRequest(Strict):
    # exactly one query: a text, or else an image
    model_config = required(
        **when(present("text"), then={"properties": {"image": {"type": "null"}}}, otherwise=present("image"))
    )
    text: str | None = Field(
        None,
        description="A text query: ITC over the gallery, then ITM on the best.",
    )
    image: OptionalImage = Field(
        None,
        description="An image query: images like it, by the cosine of the two images' mean query vectors (no "
        "ITM). " + IMAGE_DOC,
    )
    top_k: int = Field(10, ge=1, description="How many images to return.")
    itm_top_k: int | None = Field(
        None, ge=0, description="How many of the best ITC results ITM re-ranks (text queries). "
        "Default BLIP2_ITM_TOP_K; 0: ITC alone.",
    )  # fmt: skip
    filter: Annotated[
        dict[str, Any] | str | None, WithJsonSchema({"anyOf": [FILTER_SCHEMA, {"type": "null"}]})
    ] = Field(
        None, description='Metadata that must match, e.g. {"shop": "north", "year": [2023, 2024]} (a list: any '
        "of its values). Multipart: the same as JSON text.",
    )  # fmt: skip


class Hit(BaseModel):
    id: str
    relevance: float = Field(
        ...,
        description="Text query: "
        + RELEVANCE_DOC
        + " Image query: the cosine of the normalised means of the "
        "two images' query vectors, in [-1, 1] (1: the same image).",
    )
    score: float | None = Field(
        None,
        description="ITM logit + ITC similarity (LAVIS's ranking), for the `itm_top_k` re-ranked only (null "
        "for the others and for image queries).",
    )
    itc_score: float = Field(..., description="Best cosine over the image's query vectors (and the query's).")
    itm_score: float | None = Field(
        None, description="Image-text matching probability, for the `itm_top_k` re-ranked only (else null)."
    )
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    model: str
    results: list[Hit]


# -- dependencies ------------------------------------------------------------------------------------
async def get_gallery(state: StateDep, runner: RetrievalRunner) -> Gallery:
    if state.gallery is None:
        raise ApiError(
            501,
            "gallery_not_configured",
            "this server has no gallery; start it with --gallery-dir (BLIP2_GALLERY_DIR)",
        )
    return state.gallery


GalleryDep = Annotated[Gallery, Depends(get_gallery)]


def valid_id(
    image_id: Annotated[
        str, Path(description=f"The image's id ({NAME_RULE}).", json_schema_extra={"pattern": NAME_PATTERN})
    ],
) -> str:
    try:
        return check_name(image_id, "id")
    except ValueError as exc:
        raise unprocessable(str(exc)) from None


ImageId = Annotated[str, Depends(valid_id)]


def not_found(image_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no image {image_id!r} in the gallery")


# -- adding ------------------------------------------------------------------------------------------
def _metadata(value: dict[str, Any] | str, where: str) -> dict[str, Any]:
    if isinstance(value, str):  # a multipart field's JSON text, read as a JSON body's numbers are
        try:
            value = integral_floats_as_ints(json.loads(value))
        except ValueError:
            raise unprocessable(f"{where}: not valid JSON") from None
        except RecursionError:  # deeper than Python's stack: a client's mistake, never a 500
            raise unprocessable(f"{where}: nested too deep") from None
    try:
        return check_metadata(value)
    except ValueError as exc:
        raise unprocessable(f"{where}: {exc}") from None


@dataclass
class Incoming:
    """One image of an add, as it goes through the checks; `error` set once it is rejected."""

    index: int
    file: str | None  # multipart: the file part's name
    image_id: str | None
    data: bytes = b""
    metadata: dict[str, Any] | None = None
    decoded: Any = None
    error: ApiError | None = None

    @property
    def where(self) -> str:
        return f"images.{self.index}" + (f" ({self.file})" if self.file else "")

    def reject(self, error: ApiError) -> None:
        self.error = ApiError(error.status, error.type, f"{self.where}: {error.message}")

    def answer(self, status: str, image_id: str | None = None) -> Added:
        """This image's answer; `image_id`: where it is stored (None for a rejected image, so every id an
        answer names is one to read back)."""
        detail = ErrorDetail(type=self.error.type, message=self.error.message) if self.error else None
        return Added(index=self.index, file=self.file, id=image_id, status=status, error=detail)


async def _checked(
    item: Incoming, read: Callable[[], Awaitable[bytes]], metadata: dict[str, Any] | str, settings: Settings
) -> None:
    """Read, check and decode one image; a problem rejects this image only (its error says which it is)."""
    try:
        if item.image_id is not None:
            try:
                check_name(item.image_id, "id")
            except ValueError as exc:
                raise unprocessable(str(exc)) from None
        item.metadata = _metadata(metadata, "metadata")
        item.data = await read()
        item.decoded = await asyncio.to_thread(decode_image, item.data, settings)
    except ApiError as exc:
        item.reject(exc)
    except (InvalidImage, ImageTooLarge) as exc:
        item.reject(refusal(exc))


async def _incoming(given: Parsed[AddRequest], settings: Settings) -> list[Incoming]:
    """Each image of the request, read and checked on its own, from JSON objects or from multipart file parts
    + parallel fields. What is wrong with the request as a whole (no images, too many, lists that do not pair
    up) fails it."""
    body, uploads = given.body, given.files.get("images", [])
    count = len(uploads) or len(body.images)
    if uploads and body.images:
        raise unprocessable("send the images as JSON or as file parts, not both")
    if not 1 <= count <= settings.max_images_per_request:
        raise unprocessable(f"images: 1 to {settings.max_images_per_request} per request")
    items = []
    if not uploads:
        if body.ids is not None or body.metadata is not None:
            raise unprocessable(
                "`ids` and `metadata` lists are for multipart; in JSON each image has its own"
            )
        for n, image in enumerate(body.images):
            items.append(item := Incoming(n, None, image.id))
            await _checked(
                item, lambda i=image: bytes_from_string(i.image, settings), image.metadata, settings
            )
        return items
    ids = body.ids or [None] * count
    metadata = body.metadata or ["{}"] * count
    if len(ids) != count or len(metadata) != count:
        raise unprocessable("give one `ids` and one `metadata` field per file part, or none")
    for n, (upload, image_id, meta) in enumerate(zip(uploads, ids, metadata, strict=True)):
        items.append(item := Incoming(n, upload.filename or None, image_id or None))  # "": no id
        await _checked(item, lambda u=upload: read_upload(u, settings), meta, settings)
    return items


def _plan(items: list[Incoming], gallery: Gallery) -> list[tuple[Incoming, Planned]]:
    """The plan of the images not rejected so far. An id that holds other bytes rejects its image; an id
    given to two different images of one add is ambiguous and rejects every image asking for it. Then the
    rest is planned again without them (a duplicate must not point at a rejected image)."""
    good = [item for item in items if item.error is None]
    plans = gallery.plan([(item.data, item.image_id) for item in good])
    reused = {plan.image_id for plan in plans if plan.status == "reused_id"}
    rejected = False
    for item, plan in zip(good, plans, strict=True):
        if plan.image_id in reused:
            item.reject(unprocessable(f"id {plan.image_id!r} is given to two different images"))
        elif plan.status == "conflict":
            item.reject(
                ApiError(409, "conflict", f"id {plan.image_id!r} holds another image; delete it first")
            )
        rejected = rejected or item.error is not None
    return _plan(items, gallery) if rejected else list(zip(good, plans, strict=True))


@router.post(
    "/images",
    response_model=AddResponse,
    response_model_exclude_none=True,
    responses=error_responses(*GALLERY, *BODY, *MODEL, 409),
    openapi_extra=request_body(AddRequest, {"images": "many"}),
)
async def add_images(
    runner: RetrievalRunner,
    submit: SubmitDep,
    settings: SettingsDep,
    gallery: GalleryDep,
    given: Annotated[Parsed[AddRequest], parsed(AddRequest)],
) -> AddResponse:
    """Add images (idempotent on id; identical bytes are stored once), embedded in batches by the engine. Each
    image is answered on its own: a bad one is rejected (named, with its reason) and the others are stored."""
    items = await _incoming(given, settings)
    planned = await asyncio.to_thread(_plan, items, gallery)
    new = [(item, plan) for item, plan in planned if plan.status == "new"]
    outcome: dict[str, str] = {}
    if new:
        vectors = (await submit.run(EmbedJob([i.decoded for i, _ in new], [], query_vectors=True)))[
            "image_queries"
        ]
        fresh = [
            NewImage(plan.image_id, plan.sha256, item.data, item.metadata or {}, v.numpy())
            for (item, plan), v in zip(new, vectors, strict=True)
        ]
        outcome = await asyncio.to_thread(gallery.add, fresh)
    rejected = [item for item in items if item.error is not None]
    if len(rejected) == len(items):  # nothing to answer per image: the request fails, naming each image
        first = rejected[0].error
        raise ApiError(first.status, first.type, "; ".join(item.error.message for item in rejected))
    answers = {item.index: item.answer("rejected") for item in rejected}
    for item, plan in planned:
        if plan.status in ("exists", "duplicate"):
            answers[item.index] = item.answer(plan.status, plan.holder)
        elif outcome[plan.image_id] == "added":
            answers[item.index] = item.answer("added", plan.image_id)
        else:  # another request stored it between the plan and the insert
            holder = outcome[plan.image_id]
            answers[item.index] = item.answer("exists" if holder == plan.image_id else "duplicate", holder)
    return AddResponse(model=gallery.info["model"], images=[answers[item.index] for item in items])


# -- reading and deleting ----------------------------------------------------------------------------
def _item(gallery: Gallery, stored: Stored) -> Item:
    return Item(
        id=stored.image_id,
        sha256=stored.sha256,
        added_at=datetime.fromtimestamp(stored.added_at, timezone.utc).isoformat(timespec="milliseconds"),
        model=gallery.info["model"],
        metadata=stored.metadata,
    )


@router.get("/images/{image_id}", response_model=Item, responses=error_responses(*GALLERY, *IMAGE_ID))
async def get_image(image_id: ImageId, gallery: GalleryDep) -> Item:
    """An image's metadata, when it was added, and which model indexed it."""
    stored = await asyncio.to_thread(gallery.get, image_id)
    if stored is None:
        raise not_found(image_id)
    return _item(gallery, stored)


@router.get(
    "/images/{image_id}/file",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "The image's bytes, as they were added."},
        304: {"description": "Not modified: `If-None-Match` named the image's ETag."},
    }
    | error_responses(*GALLERY, *IMAGE_ID),
)
async def get_image_file(image_id: ImageId, gallery: GalleryDep, request: Request) -> Response:
    """The image itself, as it was added (what the web page shows as a search result's thumbnail)."""
    stored = await asyncio.to_thread(gallery.get, image_id)
    if stored is None:
        raise not_found(image_id)
    etag = f'"{stored.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    data = await asyncio.to_thread(gallery.read_image, stored)
    return Response(data, media_type=_image_type(data), headers=headers)


def _image_type(data: bytes) -> str:
    """The media type of stored bytes, from their header (they decoded as an image when added)."""
    with contextlib.suppress(Exception), Image.open(io.BytesIO(data)) as image:
        return Image.MIME.get(image.format or "", "application/octet-stream")
    return "application/octet-stream"


@router.delete("/images/{image_id}", responses=error_responses(*GALLERY, *IMAGE_ID))
async def delete_image(image_id: ImageId, gallery: GalleryDep) -> dict:
    """Remove an image: its vectors, and its file unless another image holds the same bytes."""
    if not await asyncio.to_thread(gallery.delete, image_id):
        raise not_found(image_id)
    return {"id": image_id, "deleted": True}


@router.get("", responses=error_responses(*GALLERY))
async def describe(gallery: GalleryDep) -> dict:
    """How many images, which model indexed them, where they are stored."""
    return {
        "count": await asyncio.to_thread(gallery.count),
        "model": gallery.info["model"],
        "fingerprint": gallery.info["fingerprint"],
        "dim": gallery.info["dim"],
        "query_vectors": gallery.info["queries"],
        "storage": gallery.describe(),
    }


# -- searching ---------------------------------------------------------------------------------------
@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(*GALLERY, *BODY, *MODEL),
    openapi_extra=request_body(SearchRequest, {"image": "one"}, required=["image"], omit=("text",)),
)
async def search(
    runner: RetrievalRunner,
    submit: SubmitDep,
    settings: SettingsDep,
    gallery: GalleryDep,
    given: Annotated[Parsed[SearchRequest], parsed(SearchRequest)],
) -> SearchResponse:
    """Text -> the best images: ITC over every query vector of the gallery's best candidates (two passes:
    candidates by mean query vector, then the exact ITC of each), then ITM on the best. Image -> the images
    most like it, by the cosine of mean query vectors. Sorted by `relevance`."""
    body = given.body
    image_query = body.image is not None or "image" in given.files
    if image_query == (body.text is not None):
        raise unprocessable("give exactly one query: `text` or `image`")
    if body.top_k > settings.gallery_max_top_k:
        raise unprocessable(f"top_k: at most {settings.gallery_max_top_k}")
    itm_top_k = min(settings.itm_top_k if body.itm_top_k is None else body.itm_top_k, body.top_k)
    if itm_top_k > settings.max_retrieve_candidates:
        raise unprocessable(f"itm_top_k: at most {settings.max_retrieve_candidates}")
    conditions = _metadata(body.filter, "filter") if body.filter is not None else {}
    try:
        wanted = check_filter(conditions)
    except ValueError as exc:
        raise unprocessable(f"filter: {exc}") from None
    if image_query:
        out = await submit.run(EmbedJob([await given.image()], [], query_vectors=True))
        hits = await asyncio.to_thread(_similar, gallery, out["image_queries"][0].numpy(), body.top_k, wanted)
        return SearchResponse(model=gallery.info["model"], results=hits)
    text = check_text(settings, "text", body.text)
    vectors = (await submit.run(EmbedJob([], [text])))["text"].numpy()
    found = await asyncio.to_thread(gallery.search, vectors, body.top_k, wanted)
    hits = [Hit(id=s.image_id, relevance=itc, itc_score=itc, metadata=s.metadata) for s, itc in found]
    if itm_top_k > 0 and found:
        await _rerank(submit, gallery, settings, text, found[:itm_top_k], hits)
    return SearchResponse(model=gallery.info["model"], results=hits)


def _similar(gallery: Gallery, queries: np.ndarray, k: int, wanted: dict[str, list[Any]]) -> list[Hit]:
    """Images like the query image, by mean-vector cosine; `itc_score` is still the max over query-vector
    pairs (nearly 1 for any two images of a small model: shown, not ranked by)."""
    found = gallery.similar(queries, k, wanted)
    stored = gallery.query_vectors([s.image_id for s, _ in found])
    return [
        Hit(
            id=s.image_id,
            relevance=cosine,
            itc_score=float((stored[s.image_id] @ queries.T).max()) if s.image_id in stored else cosine,
            metadata=s.metadata,
        )
        for s, cosine in found
    ]


async def _rerank(
    submit: Submitter,
    gallery: Gallery,
    settings: Settings,
    text: str,
    best: list[tuple[Stored, float]],
    hits: list[Hit],
) -> None:
    """ITM over the best k, read back from disk (through the vision cache); they move first, by LAVIS's score
    (their relevance). An image deleted meanwhile (its file gone) keeps its ITC rank and no ITM score."""
    positions, images = [], []
    for position, (stored, _) in enumerate(best):
        try:
            data = await asyncio.to_thread(gallery.read_image, stored)
        except FileNotFoundError:
            continue
        positions.append(position)
        images.append(await asyncio.to_thread(decode_image, data, settings))
    if not images:
        return
    ranked = await submit.run(RetrieveJob(text, None, [], images, top_k=len(images)))
    for result in ranked:
        hit = hits[positions[result["index"]]]
        logit = result["score"] - result["itc_score"]  # the ITM logit; ITC as stored, so score = logit + itc
        hit.itm_score, hit.score = result["itm_score"], logit + hit.itc_score
        hit.relevance = relevance(hit.score, hit.itc_score)
    hits.sort(key=lambda hit: -hit.relevance)  # the re-ranked first (relevance above 1), by LAVIS's score
