"""`POST /v1/chat/completions`, OpenAI-compatible: one image (an `image_url` part) and a conversation.

BLIP-2 reads one image and a flat prompt, so the turns are folded into the model's VQA format:
`Question: q1 Answer: a1 Question: q2 Answer:` (with `Short answer:` for Flan-T5 and InstructBLIP).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api import schemas
from service.api.deps import GenerationRunner, GenerationTasks, SettingsDep
from service.api.errors import unprocessable
from service.api.images import image_from_string
from service.api.openapi import API, MODEL, error_responses
from service.api.submit import SubmitDep, Submitter
from service.engine.jobs import GenerationOptions
from service.engine.prompts import Prompt
from service.engine.tasks import GenerationTask, check_text

router = APIRouter()
DEFAULT_MAX_TOKENS = 64
MIN_TEMPERATURE = 0.01


def _text_of(message: schemas.ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return " ".join(part.text or "" for part in message.content if part.type == "text").strip()


def _image_urls(messages: list[schemas.ChatMessage]) -> list[str]:
    return [
        part.image_url.url
        for message in messages
        if isinstance(message.content, list)
        for part in message.content
        if part.type == "image_url" and part.image_url is not None
    ]


def fold_conversation(messages: list[schemas.ChatMessage], template: str) -> Prompt:
    """System text first, then each user turn through the VQA template (as a question) and each assistant
    turn after it; every text of the conversation is the client's, only the template the server's. A last
    turn from the assistant is continued (its text ends the prompt); with no turns, the system text is it."""
    system = " ".join(_text_of(m) for m in messages if m.role in ("system", "developer")).strip()
    turns = [m for m in messages if m.role in ("user", "assistant")]
    pieces = [Prompt.person(system)] if system else []
    for message in turns:
        text = _text_of(message)
        if message.role == "user":
            pieces.append(Prompt.question(template, text))
        elif text:
            pieces.append(Prompt.person(text))
    return Prompt.joined(pieces)


def _options(body: schemas.ChatRequest, max_tokens_limit: int) -> GenerationOptions:
    for name in ("max_tokens", "max_completion_tokens"):  # each as the document bounds it, used or not
        if (getattr(body, name) or 0) > max_tokens_limit:
            raise unprocessable(f"{name}: at most {max_tokens_limit}")
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    # absent or under 0.01: deterministic greedy decoding (its limit; a tiny temperature overflows the logits)
    sample = body.temperature is not None and body.temperature >= MIN_TEMPERATURE
    return GenerationOptions(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=body.temperature if sample else 1.0,
        top_p=body.top_p if sample and body.top_p else 1.0,
    )


def _stop_markers(stop: str | list[str] | None) -> list[str]:
    return [m for m in ([stop] if isinstance(stop, str) else stop or []) if m]


def _apply_stop(text: str, markers: list[str]) -> tuple[str, bool]:
    for marker in markers:
        if marker in text:
            return text[: text.index(marker)], True
    return text, False


# `stream: true` answers server-sent events instead of the JSON completion.
STREAM = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "One server-sent event: `data` holds a `chat.completion.chunk` as JSON, then "
                    "`[DONE]`.",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            }
        }
    }
}


@router.post(
    "/v1/chat/completions",
    response_model=schemas.ChatResponse,
    responses=STREAM | error_responses(*API, 400, 413, 422, *MODEL),
)
async def chat_completions(
    body: schemas.ChatRequest,
    runner: GenerationRunner,
    tasks: GenerationTasks,
    submit: SubmitDep,
    settings: SettingsDep,
):
    """OpenAI chat completions with one `image_url` part (a data: URI, or an allow-listed URL)."""
    urls = _image_urls(body.messages)
    if len(urls) != 1:
        raise unprocessable(
            f"messages: BLIP-2 needs exactly one image_url part per conversation, got {len(urls)}"
        )
    options = _options(body, settings.max_new_tokens_limit)  # cheap checks before decoding the image
    for n, message in enumerate(body.messages):  # each text as the document bounds it; tokens in all below
        texts = [message.content] if isinstance(message.content, str) else message.content or []
        for text in texts:
            check_text(settings, f"messages.{n}.content", text if isinstance(text, str) else text.text or "")
    task = GenerationTask(fold_conversation(body.messages, tasks.vqa.template), options)
    image = await image_from_string(urls[0], settings)
    header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
    markers = _stop_markers(body.stop)
    if body.stream:
        return await _streamed(submit, runner, image, task, markers, header)
    result, usage = await submit.generate(task, image)
    text, stopped = _apply_stop(result.text, markers)
    finish = "stop" if stopped else result.finish_reason
    return schemas.ChatResponse(
        **header,
        choices=[
            schemas.ChatChoice(index=0, message={"role": "assistant", "content": text}, finish_reason=finish)
        ],
        usage=usage,
    )


async def _streamed(submit: Submitter, runner, image, task: GenerationTask, markers: list[str], header: dict):
    """`stream: true`: server-sent events with the answer's text as the model produces it.

    The request joins a batch like any other; the model thread hands its tokens over one by one. The
    response starts with the first token, so an error before it (422, 429, 504) keeps its status code.
    """
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[int] = asyncio.Queue()
    work = asyncio.ensure_future(
        submit.generate(task, image, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t))
    )
    next_token = asyncio.ensure_future(tokens.get())
    await asyncio.wait({work, next_token}, return_when=asyncio.FIRST_COMPLETED)
    if work.done() and work.exception() is not None:
        next_token.cancel()
        raise work.exception()
    held_back = max((len(m) for m in markers), default=1) - 1  # text that may yet become a stop marker

    def event(delta: dict, finish: str | None) -> str:
        chunk = header | {"object": "chat.completion.chunk"}
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return f"data: {json.dumps(chunk)}\n\n"

    def ending(text: str, sent: str, finish: str) -> list[str]:
        """What of the answer is not yet sent, then the finish reason and the end of the stream."""
        rest = [event({"content": text[len(sent) :]}, None)] if text.startswith(sent) and text != sent else []
        return [*rest, event({}, finish), "data: [DONE]\n\n"]

    async def events():
        nonlocal next_token
        ids: list[int] = []
        sent = ""
        try:
            yield event({"role": "assistant", "content": ""}, None)
            generating = True
            while generating:
                await asyncio.wait({work, next_token}, return_when=asyncio.FIRST_COMPLETED)
                if next_token.done():
                    arrived = [next_token.result()]
                    next_token = asyncio.ensure_future(tokens.get())
                else:  # the answer is complete: what is still queued, then the end
                    next_token.cancel()
                    arrived, generating = [], False
                    while not tokens.empty():
                        arrived.append(tokens.get_nowait())
                for token in arrived:  # one event per token, also when several arrived at once
                    ids.append(token)
                    text, stopped = _apply_stop(runner.decode(ids), markers)
                    if stopped:
                        for chunk in ending(text, sent, "stop"):
                            yield chunk
                        return
                    visible = text[: len(text) - held_back]
                    if visible.startswith(sent) and visible != sent:
                        yield event({"content": visible[len(sent) :]}, None)
                        sent = visible
            try:
                result, _ = work.result()
            except Exception:  # already answered 200: the error can only be told in the stream
                yield f"data: {json.dumps({'error': {'message': 'generation failed'}})}\n\n"
                return
            text, stopped = _apply_stop(result.text, markers)
            for chunk in ending(text, sent, "stop" if stopped else result.finish_reason):
                yield chunk
        finally:
            next_token.cancel()
            work.cancel()  # a client that hangs up mid-answer: its job is dropped if not yet running

    return StreamingResponse(events(), media_type="text/event-stream")
