"""The /gallery routes: add images once, search them by text or image, get and delete them.

Embedding goes through the batcher like every route (adds batch with /embed calls and with each other); the
ITM re-rank of a text search's best k reads those images back from disk and runs as one /retrieve job, so its
scores are LAVIS's, as /retrieve's are. Storage calls block (gRPC, disk), so they run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from PIL import Image
from pydantic import BaseModel, Field

from service.deps import Parsed, RetrievalRunner, SettingsDep, StateDep, body_doc, parsed
from service.errors import ApiError, unprocessable
from service.gallery import (
    ID_PATTERN,
    MAX_METADATA_BYTES,
    Gallery,
    NewImage,
    Stored,
    metadata_filter,
    metadata_fits,
)
from service.images import bytes_from_string, decode_image, read_upload
from service.jobs import EmbedJob, RetrieveJob
from service.schemas import IMAGE_DOC, Strict
from service.settings import Settings
from service.submit import check_text, run_job

router = APIRouter(prefix="/gallery", tags=["gallery"])
ID_DOC = (
    "Your id for the image (letters, digits, `.`, `_`, `:`, `-`; at most 128). Default: from its content."
)
METADATA_DOC = (
    f"A JSON object kept with the image (at most {MAX_METADATA_BYTES} bytes); search can filter on it."
)


# -- bodies ------------------------------------------------------------------------------------------
class GalleryImage(Strict):
    image: str = Field(..., description=IMAGE_DOC)
    id: str | None = Field(None, pattern=ID_PATTERN, description=ID_DOC)
    metadata: dict[str, Any] = Field(default_factory=dict, description=METADATA_DOC)


class AddRequest(Strict):
    images: list[GalleryImage] = Field(default_factory=list, description="JSON: the images to add.")
    ids: list[str] | None = Field(None, description="Multipart: one id per file part `images`, in order.")
    metadata: list[str] | None = Field(
        None, description="Multipart: one JSON object per file part `images`, in order."
    )


class Added(BaseModel):
    id: str = Field(..., description="The image's id in the gallery (an existing one for a duplicate).")
    status: Literal["added", "exists", "duplicate"] = Field(
        ...,
        description="`exists`: this id was there already; `duplicate`: these bytes are stored under `id`.",
    )


class AddResponse(BaseModel):
    model: str
    images: list[Added]


class Item(BaseModel):
    id: str
    sha256: str
    added_at: str = Field(..., description="When it was added (ISO 8601, UTC).")
    model: str = Field(..., description="The retrieval model whose vectors the gallery holds.")
    metadata: dict[str, Any]


class SearchRequest(Strict):
    text: str | None = Field(None, description="A text query: ITC over the gallery, then ITM on the best.")
    image: str | None = Field(None, description="An image query (images like it). " + IMAGE_DOC)
    top_k: int = Field(10, ge=1, description="How many images to return.")
    itm_top_k: int | None = Field(
        None, ge=0, description="How many of the best ITC results ITM re-ranks (text queries). "
        "Default BLIP2_ITM_TOP_K; 0: ITC alone.",
    )  # fmt: skip
    filter: dict[str, Any] | str | None = Field(
        None, description='Metadata that must match, e.g. {"shop": "north", "year": [2023, 2024]} (a list: any '
        "of its values). Multipart: the same as JSON text.",
    )  # fmt: skip


class Hit(BaseModel):
    id: str
    score: float | None = Field(
        None, description="ITM logit + ITC similarity (LAVIS's ranking), re-ranked ones."
    )
    itc_score: float = Field(..., description="Best cosine over the image's query vectors (and the query's).")
    itm_score: float | None = Field(None, description="Image-text matching probability, re-ranked ones only.")
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
ImageId = Annotated[str, Path(pattern=ID_PATTERN, description="The image's id.")]


def not_found(image_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no image {image_id!r} in the gallery")


# -- adding ------------------------------------------------------------------------------------------
def _metadata(value: dict[str, Any] | str, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise unprocessable(f"{where}: not valid JSON") from None
    if not isinstance(value, dict):
        raise unprocessable(f"{where}: must be a JSON object")
    if not metadata_fits(value):
        raise unprocessable(f"{where}: at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


async def _incoming(given: Parsed[AddRequest], settings: Settings) -> list[tuple[bytes, str | None, dict]]:
    """(bytes, id, metadata) per image, from JSON objects or from multipart file parts + parallel fields."""
    body, uploads = given.body, given.files.get("images", [])
    count = len(uploads) or len(body.images)
    if uploads and body.images:
        raise unprocessable("send the images as JSON or as file parts, not both")
    if not 1 <= count <= settings.max_images_per_request:
        raise unprocessable(f"images: 1 to {settings.max_images_per_request} per request")
    if not uploads:
        if body.ids is not None or body.metadata is not None:
            raise unprocessable(
                "`ids` and `metadata` lists are for multipart; in JSON each image has its own"
            )
        out = []
        for n, item in enumerate(body.images):
            data = await bytes_from_string(item.image, settings)
            out.append((data, item.id, _metadata(item.metadata, f"images.{n}.metadata")))
        return out
    ids = body.ids or [None] * count
    metadata = body.metadata or ["{}"] * count
    if len(ids) != count or len(metadata) != count:
        raise unprocessable("give one `ids` and one `metadata` field per file part, or none")
    for image_id in ids:
        if image_id is not None and not re.match(ID_PATTERN, image_id):
            raise unprocessable(f"ids: {image_id!r} is not a valid id")
    return [
        (await read_upload(upload, settings), image_id, _metadata(meta, f"metadata.{n}"))
        for n, (upload, image_id, meta) in enumerate(zip(uploads, ids, metadata, strict=True))
    ]


@router.post("/images", response_model=AddResponse, openapi_extra=body_doc(AddRequest, "files `images`"))
async def add_images(
    request: Request,
    runner: RetrievalRunner,
    settings: SettingsDep,
    gallery: GalleryDep,
    given: Annotated[Parsed[AddRequest], parsed(AddRequest)],
) -> AddResponse:
    """Add images (idempotent on id; identical bytes are stored once), embedded in batches by the engine."""
    items = await _incoming(given, settings)
    plans = await asyncio.to_thread(gallery.plan, [(data, image_id) for data, image_id, _ in items])
    for plan in plans:
        if plan.status == "reused_id":
            raise unprocessable(f"id {plan.image_id!r} is given to two different images")
    for plan in plans:
        if plan.status == "conflict":
            raise ApiError(409, "conflict", f"id {plan.image_id!r} holds another image; delete it first")
    new = [
        (plan, data, metadata)
        for plan, (data, _, metadata) in zip(plans, items, strict=True)
        if plan.status == "new"
    ]
    outcome: dict[str, str] = {}
    if new:
        decoded = [await asyncio.to_thread(decode_image, data, settings) for _, data, _ in new]
        vectors = (await run_job(request, EmbedJob(decoded, [], query_vectors=True)))["image_queries"]
        fresh = [
            NewImage(plan.image_id, plan.sha256, data, metadata, v.numpy())
            for (plan, data, metadata), v in zip(new, vectors, strict=True)
        ]
        outcome = await asyncio.to_thread(gallery.add, fresh)
    answers = []
    for plan in plans:
        if plan.status in ("exists", "duplicate"):
            answers.append(Added(id=plan.holder, status=plan.status))
        elif outcome[plan.image_id] == "added":
            answers.append(Added(id=plan.image_id, status="added"))
        else:  # another request stored it between the plan and the insert
            holder = outcome[plan.image_id]
            answers.append(Added(id=holder, status="exists" if holder == plan.image_id else "duplicate"))
    return AddResponse(model=gallery.info["model"], images=answers)


# -- reading and deleting ----------------------------------------------------------------------------
def _item(gallery: Gallery, stored: Stored) -> Item:
    return Item(
        id=stored.image_id,
        sha256=stored.sha256,
        added_at=datetime.fromtimestamp(stored.added_at, timezone.utc).isoformat(timespec="milliseconds"),
        model=gallery.info["model"],
        metadata=stored.metadata,
    )


@router.get("/images/{image_id}", response_model=Item)
async def get_image(image_id: ImageId, gallery: GalleryDep) -> Item:
    """An image's metadata, when it was added, and which model indexed it."""
    stored = await asyncio.to_thread(gallery.get, image_id)
    if stored is None:
        raise not_found(image_id)
    return _item(gallery, stored)


@router.get(
    "/images/{image_id}/file",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}, "description": "The image's bytes, as they were added."}},
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


@router.delete("/images/{image_id}")
async def delete_image(image_id: ImageId, gallery: GalleryDep) -> dict:
    """Remove an image: its vectors, and its file unless another image holds the same bytes."""
    if not await asyncio.to_thread(gallery.delete, image_id):
        raise not_found(image_id)
    return {"id": image_id, "deleted": True}


@router.get("")
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
@router.post("/search", response_model=SearchResponse, openapi_extra=body_doc(SearchRequest, "file `image`"))
async def search(
    request: Request,
    runner: RetrievalRunner,
    settings: SettingsDep,
    gallery: GalleryDep,
    given: Annotated[Parsed[SearchRequest], parsed(SearchRequest)],
) -> SearchResponse:
    """Text (or image) -> the best images: ITC over every query vector of every image, then ITM on the best."""
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
        where = metadata_filter(conditions)
    except ValueError as exc:
        raise unprocessable(f"filter: {exc}") from None
    if image_query:
        out = await run_job(request, EmbedJob([await given.image()], [], query_vectors=True))
        vectors = out["image_queries"][0].numpy()
    else:
        text = check_text(settings, "text", body.text)
        vectors = (await run_job(request, EmbedJob([], [text])))["text"].numpy()
    found = await asyncio.to_thread(gallery.search, vectors, body.top_k, where)
    hits = [Hit(id=s.image_id, itc_score=itc, metadata=s.metadata) for s, itc in found]
    if not image_query and itm_top_k > 0 and found:
        await _rerank(request, gallery, settings, text, found[:itm_top_k], hits)
    return SearchResponse(model=gallery.info["model"], results=hits)


async def _rerank(
    request: Request,
    gallery: Gallery,
    settings: Settings,
    text: str,
    best: list[tuple[Stored, float]],
    hits: list[Hit],
) -> None:
    """ITM over the best k, read back from disk (through the vision cache); they move first, by LAVIS's score.
    An image deleted meanwhile (its file gone) keeps its ITC rank and no ITM score."""
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
    ranked = await run_job(request, RetrieveJob(text, None, [], images, top_k=len(images)))
    for result in ranked:
        hit = hits[positions[result["index"]]]
        logit = result["score"] - result["itc_score"]  # the ITM logit; ITC as stored, so score = logit + itc
        hit.itm_score, hit.score = result["itm_score"], logit + hit.itc_score
    reranked = sorted((h for h in hits[: len(best)] if h.score is not None), key=lambda hit: -hit.score)
    hits[: len(best)] = reranked + [h for h in hits[: len(best)] if h.score is None]
