"""HTTP routes. Each parses and bounds its input, queues one job on the engine, and shapes the answer."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Hashable
from typing import Any

from fastapi import APIRouter, Request, Response, UploadFile
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile

from service import schemas
from service.batching import DeadlineExceeded, EngineStopped, InvalidInput, QueueFull
from service.errors import ApiError, bad_request, model_not_loaded, unavailable, unprocessable
from service.images import image_from_string, image_from_upload
from service.inference import EmbedJob, GenerateJob, GenerationOptions, RetrieveJob, Runner
from service.settings import Settings

router = APIRouter()

# The paper's settings: captions with beam 5, 8-30 tokens; VQA with beam 5, at most 10 tokens, length
# penalty -1 (short answers). /generate defaults to plain greedy decoding.
CAPTION_DEFAULTS = {"max_new_tokens": 30, "min_new_tokens": 8, "num_beams": 5, "length_penalty": 1.0}
VQA_DEFAULTS = {"max_new_tokens": 10, "min_new_tokens": 0, "num_beams": 5, "length_penalty": -1.0}
GENERATE_DEFAULTS = {"max_new_tokens": 30, "min_new_tokens": 0, "num_beams": 1, "length_penalty": 1.0}
INSTRUCT_CAPTION_PROMPT = "A short image description:"


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def runner_of(request: Request, need: str) -> Runner:
    """The runner, once the models are up; a clear error when the route's model is not configured."""
    state = request.app.state
    if state.phase == "draining":
        raise unavailable("the server is shutting down")
    if state.phase != "ready":
        raise unavailable(
            "the model is still loading" if state.phase == "loading" else "the model failed to load"
        )
    runner: Runner = state.runner
    if need == "generation" and runner.models.generation is None:
        raise model_not_loaded("generation model", "--model (BLIP2_MODEL)")
    if need == "retrieval" and runner.models.retrieval is None:
        raise model_not_loaded("retrieval model", "--retrieval-model (BLIP2_RETRIEVAL_MODEL)")
    return runner


# -- bodies: JSON or multipart, validated by the same model ------------------------------------------
def _is_list(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    return field is not None and list in (
        typing.get_origin(field.annotation),
        *map(typing.get_origin, typing.get_args(field.annotation)),
    )


async def parse_body(request: Request, model: type[BaseModel]) -> tuple[Any, dict[str, list[UploadFile]]]:
    """The body as `model`, plus the uploaded files by field name (multipart only)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, list[UploadFile]] = {}
    if content_type == "multipart/form-data":
        settings = settings_of(request)
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=1000)
        data: dict[str, Any] = {}
        for name in form.keys():
            values = form.getlist(name)
            uploads = [v for v in values if isinstance(v, StarletteUploadFile)]
            texts = [v for v in values if isinstance(v, str)]
            if uploads:
                files[name] = uploads
            if texts:
                data[name] = texts if _is_list(model, name) else texts[-1]
    elif content_type in ("application/json", ""):
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise bad_request("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise unprocessable("the body must be a JSON object")
    else:
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    return model.model_validate(data), files


def body_doc(model: type[BaseModel], files: str) -> dict:
    """OpenAPI for a route that reads JSON or multipart itself (FastAPI cannot declare both)."""
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {
                    "schema": {"type": "object", "description": f"{files}; other fields as in JSON"}
                },
            },
        }
    }


async def one_image(request: Request, value: str | None, uploads: list[UploadFile] | None) -> Image.Image:
    settings = settings_of(request)
    if uploads:
        if len(uploads) > 1 or value is not None:
            raise unprocessable("send exactly one image")
        return await image_from_upload(uploads[0], settings)
    if value is None:
        raise unprocessable("image: an image is required (JSON field `image` or multipart file `image`)")
    return await image_from_string(value, settings)


async def many_images(
    request: Request, values: list[str] | None, uploads: list[UploadFile] | None
) -> list[Image.Image]:
    settings = settings_of(request)
    count = len(values or []) + len(uploads or [])
    if count > settings.max_images_per_request:
        raise unprocessable(f"images: at most {settings.max_images_per_request} per request")
    images = [await image_from_string(v, settings) for v in values or []]
    return images + [await image_from_upload(u, settings) for u in uploads or []]


def check_text(settings: Settings, name: str, text: str) -> str:
    if len(text) > settings.max_prompt_chars:
        raise unprocessable(f"{name}: at most {settings.max_prompt_chars} characters")
    return text


def model_defaults(runner: Runner, route_defaults: dict) -> dict:
    """The route's defaults (the paper's), overridden by what the model folder's generation_config.json
    sets (e.g. a model whose captions are shorter than the paper's 8-token minimum); a request overrides both."""
    return route_defaults | runner.models.generation.generation_defaults


def make_options(params: schemas.GenerationParams, defaults: dict, settings: Settings) -> GenerationOptions:
    values = {k: getattr(params, k) if getattr(params, k) is not None else v for k, v in defaults.items()}
    if values["max_new_tokens"] > settings.max_new_tokens_limit:
        raise unprocessable(f"max_new_tokens: at most {settings.max_new_tokens_limit}")
    if values["num_beams"] > settings.max_num_beams:
        raise unprocessable(f"num_beams: at most {settings.max_num_beams}")
    if values["min_new_tokens"] > values["max_new_tokens"]:
        if params.min_new_tokens is not None:
            raise unprocessable("min_new_tokens: must not exceed max_new_tokens")
        values["min_new_tokens"] = values["max_new_tokens"]  # a route default yields to a small max
    return GenerationOptions(
        **values,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
    )


def check_length(runner: Runner, prompt: str, options: GenerationOptions) -> int:
    """Refuse (422) what would run past the LLM's positions instead of failing inside the model."""
    tokens = runner.prompt_tokens(prompt)
    limit = runner.models.generation.max_positions
    if limit is not None and tokens + options.max_new_tokens > limit:
        raise unprocessable(
            f"prompt ({tokens} tokens with the image) + max_new_tokens ({options.max_new_tokens}) exceeds "
            f"the model's {limit} positions"
        )
    return tokens


# -- running a job -----------------------------------------------------------------------------------
async def _client_gone(request: Request) -> None:
    # Waiting for the ASGI disconnect message directly (as vLLM does) works behind pure ASGI middleware.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_job(request: Request, key: Hashable, job: Any) -> Any:
    """Queue a job and wait for it, dropping it from the queue if the client hangs up first."""
    state = request.app.state
    meta = request.scope.setdefault("state", {})  # the access log reads batch_size from here
    work = asyncio.ensure_future(state.engine.submit(key, job, state.settings.request_timeout_s, meta))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ApiError(499, "client_closed_request", "the client closed the connection")
    try:
        return work.result()
    except (ApiError, QueueFull, EngineStopped, DeadlineExceeded):
        raise
    except InvalidInput as exc:  # found by the runner (or by isolating the request from its batch)
        raise unprocessable(str(exc)) from None
    except Exception:
        # A failed model call (logged by the engine) is answered 500 as a handled error: an unhandled one
        # is re-raised by Starlette after its 500, and uvicorn then closes the keep-alive connection, which
        # fails the client's next request on it.
        raise ApiError(500, "internal_error", "the server failed to answer this request") from None


async def generate_text(
    request: Request, runner: Runner, image, prompt: str, options: GenerationOptions, on_token=None
):
    prompt_tokens = check_length(runner, prompt, options)
    result = await run_job(request, ("generate", options), GenerateJob(image, prompt, on_token))
    request.app.state.metrics.generated_tokens.inc(result.tokens)
    usage = schemas.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=result.tokens,
        total_tokens=prompt_tokens + result.tokens,
    )
    if settings_of(request).log_prompts:
        request.scope.setdefault("state", {})["prompt"] = prompt
    return result, usage


def family_prompt(runner: Runner, settings: Settings) -> tuple[str, str]:
    """Default (caption prompt, VQA template) for the loaded model family."""
    gen = runner.models.generation
    instruct = gen.kind == "instructblip"
    caption = (
        settings.caption_prompt
        if settings.caption_prompt is not None
        else (INSTRUCT_CAPTION_PROMPT if instruct else "")
    )
    if settings.vqa_prompt_template is not None:
        return caption, settings.vqa_prompt_template
    decoder = not gen.is_encoder_decoder and not instruct
    return caption, "Question: {} Answer:" if decoder else "Question: {} Short answer:"


# -- routes ------------------------------------------------------------------------------------------
@router.post(
    "/caption",
    response_model=schemas.CaptionResponse,
    openapi_extra=body_doc(schemas.CaptionRequest, "file `image`"),
)
async def caption(request: Request) -> schemas.CaptionResponse:
    """Image (+ optional prompt and generation options) -> caption."""
    settings = settings_of(request)
    runner = runner_of(request, "generation")
    body, files = await parse_body(request, schemas.CaptionRequest)
    # cheap checks before decoding the image
    options = make_options(body, model_defaults(runner, CAPTION_DEFAULTS), settings)
    default_prompt = family_prompt(runner, settings)[0]
    prompt = check_text(settings, "prompt", body.prompt if body.prompt is not None else default_prompt)
    image = await one_image(request, body.image, files.get("image"))
    result, usage = await generate_text(request, runner, image, prompt, options)
    return schemas.CaptionResponse(model=settings.model_name, caption=result.text, usage=usage)


@router.post(
    "/vqa", response_model=schemas.VqaResponse, openapi_extra=body_doc(schemas.VqaRequest, "file `image`")
)
async def vqa(request: Request) -> schemas.VqaResponse:
    """Image + question -> short answer (beam 5, at most 10 tokens, length penalty -1 by default)."""
    settings = settings_of(request)
    runner = runner_of(request, "generation")
    body, files = await parse_body(request, schemas.VqaRequest)
    options = make_options(body, model_defaults(runner, VQA_DEFAULTS), settings)
    template = body.prompt_template or family_prompt(runner, settings)[1]
    if template.count("{}") != 1:
        raise unprocessable("prompt_template: must hold exactly one `{}` for the question")
    prompt = check_text(settings, "question", template.replace("{}", body.question))
    image = await one_image(request, body.image, files.get("image"))
    result, usage = await generate_text(request, runner, image, prompt, options)
    return schemas.VqaResponse(model=settings.model_name, answer=result.text, usage=usage)


@router.post(
    "/generate",
    response_model=schemas.GenerateResponse,
    openapi_extra=body_doc(schemas.GenerateRequest, "file `image`"),
)
async def generate(request: Request) -> schemas.GenerateResponse:
    """Image + free prompt + generation options -> text."""
    settings = settings_of(request)
    runner = runner_of(request, "generation")
    body, files = await parse_body(request, schemas.GenerateRequest)
    options = make_options(body, model_defaults(runner, GENERATE_DEFAULTS), settings)
    prompt = check_text(settings, "prompt", body.prompt)
    image = await one_image(request, body.image, files.get("image"))
    result, usage = await generate_text(request, runner, image, prompt, options)
    return schemas.GenerateResponse(
        model=settings.model_name, text=result.text, finish_reason=result.finish_reason, usage=usage
    )


@router.post(
    "/embed",
    response_model=schemas.EmbedResponse,
    response_model_exclude_none=True,
    openapi_extra=body_doc(schemas.EmbedRequest, "files `images`"),
)
async def embed(request: Request) -> schemas.EmbedResponse:
    """Images and/or texts -> L2-normalised embeddings (ITC space, 256-d for BLIP-2)."""
    settings = settings_of(request)
    runner = runner_of(request, "retrieval")
    body, files = await parse_body(request, schemas.EmbedRequest)
    images = await many_images(request, body.images, files.get("images"))
    if len(body.texts) > settings.max_retrieve_candidates:
        raise unprocessable(f"texts: at most {settings.max_retrieve_candidates} per request")
    texts = [check_text(settings, "texts", t) for t in body.texts]
    if not images and not texts:
        raise unprocessable("give at least one image or text")
    out = await run_job(request, ("embed",), EmbedJob(images, texts, body.return_query_embeddings))
    queries = out.get("image_queries")
    return schemas.EmbedResponse(
        model=settings.model_name,
        dim=runner.models.retrieval.model.config.image_text_hidden_size,
        image_embeddings=out["image"].tolist() if "image" in out else [],
        text_embeddings=out["text"].tolist() if "text" in out else [],
        image_query_embeddings=queries.tolist() if queries is not None else None,
    )


@router.post(
    "/retrieve",
    response_model=schemas.RetrieveResponse,
    openapi_extra=body_doc(schemas.RetrieveRequest, "file `image` or files `images`"),
)
async def retrieve(request: Request) -> schemas.RetrieveResponse:
    """A text or image query + candidates of the other kind -> ranked: ITC for all, ITM for the top k."""
    settings = settings_of(request)
    runner_of(request, "retrieval")
    body, files = await parse_body(request, schemas.RetrieveRequest)
    image_query = body.image is not None or "image" in files
    if image_query == (body.text is not None):
        raise unprocessable("give exactly one query: `text` or `image`")
    if image_query:
        candidates = [check_text(settings, "texts", t) for t in body.texts or []]
        if body.images or "images" in files:
            raise unprocessable("an image query ranks `texts`, not images")
        query_image = await one_image(request, body.image, files.get("image"))
        job = RetrieveJob(None, query_image, candidates, [], body.top_k or settings.itm_top_k)
    else:
        if body.texts:
            raise unprocessable("a text query ranks `images`, not texts")
        candidates = await many_images(request, body.images, files.get("images"))
        query_text = check_text(settings, "text", body.text)
        job = RetrieveJob(query_text, None, [], candidates, body.top_k or settings.itm_top_k)
    if not candidates:
        raise unprocessable("give at least one candidate")
    if len(candidates) > settings.max_retrieve_candidates:
        raise unprocessable(f"at most {settings.max_retrieve_candidates} candidates per request")
    results = await run_job(request, ("retrieve",), job)
    return schemas.RetrieveResponse(model=settings.model_name, results=results)


@router.get("/health", include_in_schema=True)
async def health(request: Request) -> dict:
    """Liveness: 200 while the process can work (also while loading); 503 once loading failed."""
    if request.app.state.phase == "failed":
        raise unavailable(f"model loading failed: {request.app.state.load_error}")
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict:
    """Readiness: 200 once the models are loaded and warm; 503 while loading and while draining."""
    phase = request.app.state.phase
    if phase != "ready":
        raise unavailable(f"not ready: {phase}", retry_after_s=1 if phase == "loading" else 5)
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """The served model, in OpenAI's list format."""
    settings = settings_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": settings.model_name,
                "object": "model",
                "created": request.app.state.started,
                "owned_by": "blip2-stack",
            }
        ],
    }
