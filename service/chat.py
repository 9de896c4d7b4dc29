"""`POST /v1/chat/completions`, OpenAI-compatible: one image (an `image_url` part) and a conversation.

BLIP-2 reads one image and a flat prompt, so the turns are folded into the model's VQA format:
`Question: q1 Answer: a1 Question: q2 Answer:` (with `Short answer:` for Flan-T5 and InstructBLIP).
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service import schemas
from service.errors import unprocessable
from service.images import image_from_string
from service.inference import GenerationOptions
from service.routes import check_text, family_prompt, generate_text, runner_of, settings_of

router = APIRouter()
DEFAULT_MAX_TOKENS = 64


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


def fold_conversation(messages: list[schemas.ChatMessage], template: str) -> str:
    """System text first, then each user turn through the VQA template and each assistant turn after it."""
    system = " ".join(_text_of(m) for m in messages if m.role in ("system", "developer")).strip()
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise unprocessable("messages: the last turn must come from the user")
    pieces = [system] if system else []
    for message in turns:
        text = _text_of(message)
        pieces.append(template.replace("{}", text) if message.role == "user" else text)
    return " ".join(p for p in pieces if p)


def _options(body: schemas.ChatRequest, max_tokens_limit: int) -> GenerationOptions:
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        raise unprocessable(f"max_tokens: at most {max_tokens_limit}")
    sample = bool(body.temperature)  # absent or 0: deterministic greedy decoding
    return GenerationOptions(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=body.temperature if sample else 1.0,
        top_p=body.top_p if sample and body.top_p else 1.0,
    )


def _apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    for marker in [stop] if isinstance(stop, str) else stop or []:
        if marker and marker in text:
            return text[: text.index(marker)], True
    return text, False


@router.post("/v1/chat/completions", response_model=schemas.ChatResponse)
async def chat_completions(body: schemas.ChatRequest, request: Request):
    """OpenAI chat completions with one `image_url` part (a data: URI, or an allow-listed URL)."""
    settings = settings_of(request)
    runner = runner_of(request, "generation")
    urls = _image_urls(body.messages)
    if len(urls) != 1:
        raise unprocessable(
            f"messages: BLIP-2 needs exactly one image_url part per conversation, got {len(urls)}"
        )
    options = _options(body, settings.max_new_tokens_limit)  # cheap checks before decoding the image
    folded = fold_conversation(body.messages, family_prompt(runner, settings)[1])
    prompt = check_text(settings, "messages", folded)
    image = await image_from_string(urls[0], settings)
    result, usage = await generate_text(request, runner, image, prompt, options)
    text, stopped = _apply_stop(result.text, body.stop)
    finish = "stop" if stopped else result.finish_reason
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(
            _stream(completion_id, created, settings.model_name, text, finish), media_type="text/event-stream"
        )
    return schemas.ChatResponse(
        id=completion_id,
        created=created,
        model=settings.model_name,
        choices=[
            schemas.ChatChoice(index=0, message={"role": "assistant", "content": text}, finish_reason=finish)
        ],
        usage=usage,
    )


async def _stream(completion_id: str, created: int, model: str, text: str, finish: str):
    """Server-sent events for `stream: true`: the whole answer as one delta (generation is not incremental)."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    deltas = [({"role": "assistant", "content": text}, None), ({}, finish)]
    for delta, reason in deltas:
        chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
