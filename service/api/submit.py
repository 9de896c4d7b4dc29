"""Queueing a route's work on the engine for one HTTP request (`SubmitDep`): the job is dropped if the client
hangs up first, the access log learns its batch size, and a failure that is nobody's fault answers 500."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from PIL import Image

from service.api import schemas
from service.api.deps import StateDep
from service.api.errors import ApiError, client_closed, internal_error
from service.api.state import ServerState
from service.engine.batching import BatcherStopped, DeadlineExceeded, InvalidInput, QueueFull
from service.engine.jobs import Generated, GenerateJob
from service.engine.submit import prepare_and_submit
from service.engine.tasks import GenerationTask


async def _client_gone(request: Request) -> None:
    # Waiting for the ASGI disconnect message directly (as vLLM does) works behind pure ASGI middleware.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Submitter:
    """The engine as one request's route sees it."""

    request: Request
    state: ServerState

    async def run(self, job: Any) -> Any:
        """Prepare a job's images, queue it and wait for it, dropping it if the client hangs up first."""
        meta = self.request.scope.setdefault("state", {})  # the access log reads batch_size from here
        state = self.state
        queued = prepare_and_submit(state.runner, state.batcher, job, state.settings.request_timeout_s, meta)
        work = asyncio.ensure_future(queued)
        gone = asyncio.ensure_future(_client_gone(self.request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise client_closed()
        try:
            return work.result()
        except (ApiError, QueueFull, BatcherStopped, DeadlineExceeded, InvalidInput):
            raise  # InvalidInput: found by the runner (or by isolating the request from its batch), a 422
        except Exception:
            # A failed model call (logged by the batcher) is answered 500 as a handled error: an unhandled one
            # is re-raised by Starlette after its 500, and uvicorn then closes the keep-alive connection, which
            # fails the client's next request on it.
            raise internal_error() from None

    async def generate(
        self, task: GenerationTask, image: Image.Image, on_token: Callable[[int], None] | None = None
    ) -> tuple[Generated, schemas.Usage]:
        """Generate a task's answer from an image, refused (422) where the prompt and the answer would run past
        the LLM's positions; with the tokens it took."""
        runner = self.state.runner
        prompt_tokens = runner.checked_prompt_tokens(task.prompt, task.options)
        result = await self.run(GenerateJob(image, task.prompt, task.options, on_token))
        self.state.metrics.generated_tokens.inc(result.tokens)
        usage = schemas.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=result.tokens,
            total_tokens=prompt_tokens + result.tokens,
        )
        if self.state.settings.log_prompts:  # the prompt as the model read it
            self.request.scope.setdefault("state", {})["prompt"] = runner.prompt_text(task.prompt)
        return result, usage


async def submitter(request: Request, state: StateDep) -> Submitter:
    return Submitter(request, state)


SubmitDep = Annotated[Submitter, Depends(submitter)]
