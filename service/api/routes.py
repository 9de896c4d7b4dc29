"""HTTP routes. Each takes its runner (or task profiles) and parsed input from service.api.deps, bounds its
input, queues one job on the engine (service.api.submit), and shapes the answer. The chat route is their
sibling, in chat.py."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api import schemas
from service.api.deps import (
    CaptionInput,
    EmbedInput,
    GenerateInput,
    GenerationTasks,
    RetrievalRunner,
    RetrieveInput,
    SettingsDep,
    StateDep,
    VqaInput,
)
from service.api.errors import unavailable, unprocessable
from service.api.openapi import API, BODY, MODEL, PROBE, error_responses, request_body
from service.api.state import Phase
from service.api.submit import SubmitDep
from service.engine.jobs import EmbedJob, RetrieveJob
from service.engine.tasks import check_text

router = APIRouter()
WORK = error_responses(*API, *BODY, *MODEL)  # what a route that queues work on a model may answer


# -- generation --------------------------------------------------------------------------------------
@router.post(
    "/caption",
    response_model=schemas.CaptionResponse,
    responses=WORK,
    openapi_extra=request_body(schemas.CaptionRequest, {"image": "one"}),
)
async def caption(
    tasks: GenerationTasks, submit: SubmitDep, settings: SettingsDep, given: CaptionInput
) -> schemas.CaptionResponse:
    """Image (+ optional prompt and generation options) -> caption."""
    body = given.body  # the task is checked before the image is decoded
    result, usage = await submit.generate(tasks.caption.task(body, body.prompt), await given.image())
    return schemas.CaptionResponse(model=settings.model_name, caption=result.text, usage=usage)


@router.post(
    "/vqa",
    response_model=schemas.VqaResponse,
    responses=WORK,
    openapi_extra=request_body(schemas.VqaRequest, {"image": "one"}),
)
async def vqa(
    tasks: GenerationTasks, submit: SubmitDep, settings: SettingsDep, given: VqaInput
) -> schemas.VqaResponse:
    """Image + question -> short answer (beam 5, at most 10 tokens, length penalty -1 by default)."""
    body = given.body
    task = tasks.vqa.task(body, body.question, body.prompt_template)
    result, usage = await submit.generate(task, await given.image())
    return schemas.VqaResponse(model=settings.model_name, answer=result.text, usage=usage)


@router.post(
    "/generate",
    response_model=schemas.GenerateResponse,
    responses=WORK,
    openapi_extra=request_body(schemas.GenerateRequest, {"image": "one"}),
)
async def generate(
    tasks: GenerationTasks, submit: SubmitDep, settings: SettingsDep, given: GenerateInput
) -> schemas.GenerateResponse:
    """Image + free prompt + generation options -> text."""
    body = given.body
    result, usage = await submit.generate(tasks.generate.task(body, body.prompt), await given.image())
    return schemas.GenerateResponse(
        model=settings.model_name, text=result.text, finish_reason=result.finish_reason, usage=usage
    )


# -- retrieval ---------------------------------------------------------------------------------------
@router.post(
    "/embed",
    response_model=schemas.EmbedResponse,
    response_model_exclude_none=True,
    responses=WORK,
    openapi_extra=request_body(schemas.EmbedRequest, {"images": "many"}, required=["images"]),
)
async def embed(
    runner: RetrievalRunner, submit: SubmitDep, settings: SettingsDep, given: EmbedInput
) -> schemas.EmbedResponse:
    """Images and/or texts -> L2-normalised embeddings (ITC space, 256-d for BLIP-2)."""
    body = given.body
    images = await given.images()
    if len(body.texts) > settings.max_retrieve_candidates:
        raise unprocessable(f"texts: at most {settings.max_retrieve_candidates} per request")
    texts = [check_text(settings, "texts", t) for t in body.texts]
    if not images and not texts:
        raise unprocessable("give at least one image or text")
    out = await submit.run(EmbedJob(images, texts, body.return_query_embeddings))
    queries = out.get("image_queries")
    return schemas.EmbedResponse(
        model=settings.model_name,
        dim=runner.embedding_dim,
        image_embeddings=out["image"].tolist() if "image" in out else [],
        text_embeddings=out["text"].tolist() if "text" in out else [],
        image_query_embeddings=queries.tolist() if queries is not None else None,
    )


@router.post(
    "/retrieve",
    response_model=schemas.RetrieveResponse,
    responses=WORK,
    # multipart: the text query, ranking image files (an image file ranking `texts` works too, undocumented)
    openapi_extra=request_body(
        schemas.RetrieveRequest, {"images": "many"}, required=["text", "images"], omit=("image", "texts")
    ),
)
async def retrieve(
    runner: RetrievalRunner, submit: SubmitDep, settings: SettingsDep, given: RetrieveInput
) -> schemas.RetrieveResponse:
    """A text or image query + candidates of the other kind -> ranked: ITC for all, ITM for the top k."""
    body, files = given.body, given.files
    image_query = body.image is not None or "image" in files
    if image_query == (body.text is not None):
        raise unprocessable("give exactly one query: `text` or `image`")
    if image_query:
        candidates = [check_text(settings, "texts", t) for t in body.texts or []]
        if body.images or "images" in files:
            raise unprocessable("an image query ranks `texts`, not images")
        job = RetrieveJob(None, await given.image(), candidates, [], body.top_k or settings.itm_top_k)
    else:
        if body.texts:
            raise unprocessable("a text query ranks `images`, not texts")
        candidates = await given.images()
        query_text = check_text(settings, "text", body.text)
        job = RetrieveJob(query_text, None, [], candidates, body.top_k or settings.itm_top_k)
    if not candidates:
        raise unprocessable("give at least one candidate")
    if len(candidates) > settings.max_retrieve_candidates:
        raise unprocessable(f"at most {settings.max_retrieve_candidates} candidates per request")
    results = await submit.run(job)
    return schemas.RetrieveResponse(model=settings.model_name, results=results)


# -- probes, metrics, model list ---------------------------------------------------------------------
@router.get("/health", responses=error_responses(*PROBE))
async def health(state: StateDep) -> dict:
    """Liveness: 200 while the process can work (also while loading); 503 once loading failed."""
    if state.phase == Phase.FAILED:
        raise unavailable(f"model loading failed: {state.load_error}")
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(*PROBE))
async def ready(state: StateDep) -> dict:
    """Readiness: 200 once the models are loaded and warm; 503 while loading and while draining."""
    if state.phase != Phase.READY:
        retry_after_s = 1 if state.phase == Phase.LOADING else 5
        raise unavailable(f"not ready: {state.phase.value}", retry_after_s=retry_after_s)
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses=error_responses(*API))
async def models(state: StateDep) -> dict:
    """The served model, in OpenAI's list format."""
    settings = state.settings
    return {
        "object": "list",
        "data": [
            {
                "id": settings.model_name,
                "object": "model",
                "created": state.started,
                "owned_by": "blip2-stack",
            }
        ],
    }
