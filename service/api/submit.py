"""What the routes share between a parsed request and its answer: the bounds on text and generation
settings, and queueing a job on the batcher (dropped if the client hangs up first)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request

from service.api import schemas
from service.api.deps import get_state
from service.api.errors import ApiError, unprocessable
from service.api.state import ServerState
from service.engine.batching import BatcherStopped, DeadlineExceeded, InvalidInput, QueueFull
from service.engine.inference import Runner
from service.engine.jobs import Generated, GenerateJob, GenerationOptions
from service.engine.prompts import Prompt
from service.settings import Settings

log = logging.getLogger("service.submit")


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
    # The maximum wins, as in transformers' generate(): the document cannot tie one field's bound to another's
    values["min_new_tokens"] = min(values["min_new_tokens"], values["max_new_tokens"])
    return GenerationOptions(
        **values,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
    )


def check_length(runner: Runner, prompt: str | Prompt, options: GenerationOptions) -> int:
    """Refuse (422) what would run past the LLM's positions instead of failing inside the model."""
    tokens = runner.prompt_tokens(prompt)
    limit = runner.models.generation.max_positions
    if limit is not None and tokens + options.max_new_tokens > limit:
        raise unprocessable(
            f"prompt ({tokens} tokens with the image) + max_new_tokens ({options.max_new_tokens}) exceeds "
            f"the model's {limit} positions"
        )
    return tokens


async def _client_gone(request: Request) -> None:
    # Waiting for the ASGI disconnect message directly (as vLLM does) works behind pure ASGI middleware.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _prepared_and_queued(state: ServerState, job: Any, meta: dict) -> Any:
    # The job's images are resized and normalised here, on a worker thread, while the model thread runs
    # other batches (on the model thread, real-size photos would cost it milliseconds per image).
    try:
        await asyncio.to_thread(state.runner.prepare, job)
    except Exception:
        log.exception("preparing a request's images failed")
        raise
    return await state.batcher.submit(job, state.settings.request_timeout_s, meta)


async def run_job(request: Request, job: Any) -> Any:
    """Prepare a job's images, queue it and wait for it, dropping it if the client hangs up first."""
    state = get_state(request)
    meta = request.scope.setdefault("state", {})  # the access log reads batch_size from here
    work = asyncio.ensure_future(_prepared_and_queued(state, job, meta))
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
    except (ApiError, QueueFull, BatcherStopped, DeadlineExceeded):
        raise
    except InvalidInput as exc:  # found by the runner (or by isolating the request from its batch)
        raise unprocessable(str(exc)) from None
    except Exception:
        # A failed model call (logged by the batcher) is answered 500 as a handled error: an unhandled one
        # is re-raised by Starlette after its 500, and uvicorn then closes the keep-alive connection, which
        # fails the client's next request on it.
        raise ApiError(500, "internal_error", "the server failed to answer this request") from None


async def generate_text(
    request: Request, runner: Runner, image, prompt: str | Prompt, options: GenerationOptions, on_token=None
) -> tuple[Generated, schemas.Usage]:
    """Generate from a prompt: the server's own text (a string) or one holding a person's texts (a
    `Prompt`, which the runner processes as the model was trained where it tokenises it)."""
    prompt_tokens = check_length(runner, prompt, options)
    result = await run_job(request, GenerateJob(image, prompt, options, on_token))
    state = get_state(request)
    state.metrics.generated_tokens.inc(result.tokens)
    usage = schemas.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=result.tokens,
        total_tokens=prompt_tokens + result.tokens,
    )
    if state.settings.log_prompts:
        request.scope.setdefault("state", {})["prompt"] = runner.prompt_text(prompt)  # as the model read it
    return result, usage
