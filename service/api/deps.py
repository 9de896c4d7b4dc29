"""Dependencies the routes declare (`Annotated[..., Depends(...)]`, as in full-stack-fastapi-template): the
server state, the settings, the runner a route needs (503 while not ready, 501 when its model is not
configured), the generation model's task profiles, and the body parsed from JSON or multipart with its images
decoded on demand."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request, UploadFile
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile

from service.api import schemas
from service.api.errors import ApiError, bad_request, model_not_loaded, unavailable, unprocessable
from service.api.images import image_from_string, image_from_upload
from service.api.state import Phase, ServerState
from service.engine.inference import Runner
from service.engine.tasks import TaskProfiles
from service.settings import Settings


# Dependencies are `async def` although they never wait: FastAPI runs a plain `def` one in its thread pool,
# a thread hop per dependency per request, paid on the same GIL as the model thread.
async def _state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _ready_runner(state: ServerState) -> Runner:
    if state.phase == Phase.DRAINING:
        raise unavailable("the server is shutting down")
    if state.phase != Phase.READY:
        loading = state.phase == Phase.LOADING
        raise unavailable("the model is still loading" if loading else "the model failed to load")
    return state.runner


async def generation_runner(state: StateDep) -> Runner:
    runner = _ready_runner(state)
    if runner.models.generation is None:
        raise model_not_loaded("generation model", "--model (BLIP2_MODEL)")
    return runner


async def retrieval_runner(state: StateDep) -> Runner:
    runner = _ready_runner(state)
    if runner.models.retrieval is None:
        raise model_not_loaded("retrieval model", "--retrieval-model (BLIP2_RETRIEVAL_MODEL)")
    return runner


GenerationRunner = Annotated[Runner, Depends(generation_runner)]
RetrievalRunner = Annotated[Runner, Depends(retrieval_runner)]


async def generation_tasks(runner: GenerationRunner, state: StateDep) -> TaskProfiles:
    """The generation model's task profiles (built with it), once its runner may be used."""
    return state.tasks


GenerationTasks = Annotated[TaskProfiles, Depends(generation_tasks)]


# -- bodies: JSON or multipart, validated by the same model ------------------------------------------
Body = TypeVar("Body", bound=BaseModel)


@dataclass
class Parsed(Generic[Body]):
    """A validated body and its uploaded files; images are decoded when a route asks, after its cheap checks."""

    body: Body
    files: dict[str, list[UploadFile]]
    settings: Settings

    async def image(self, name: str = "image") -> Image.Image:
        """Exactly one image: the JSON field `name` (base64 or data: URI) or the multipart file `name`."""
        value, uploads = getattr(self.body, name), self.files.get(name)
        if uploads:
            if len(uploads) > 1 or value is not None:
                raise unprocessable("send exactly one image")
            return await image_from_upload(uploads[0], self.settings)
        if value is None:
            raise unprocessable(
                f"{name}: an image is required (JSON field `{name}` or multipart file `{name}`)"
            )
        return await image_from_string(value, self.settings)

    async def images(self, name: str = "images") -> list[Image.Image]:
        values, uploads = getattr(self.body, name) or [], self.files.get(name) or []
        if len(values) + len(uploads) > self.settings.max_images_per_request:
            raise unprocessable(f"{name}: at most {self.settings.max_images_per_request} per request")
        images = [await image_from_string(v, self.settings) for v in values]
        return images + [await image_from_upload(u, self.settings) for u in uploads]


def _is_list(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    return field is not None and list in (
        typing.get_origin(field.annotation),
        *map(typing.get_origin, typing.get_args(field.annotation)),
    )


def _takes_text(model: type[BaseModel], name: str) -> bool:
    """Whether the field holds text (str, list[str], ...): a form field's text is then its value as it is."""
    field = model.model_fields.get(name)
    if field is None:
        return True  # refused as an unknown field, by name
    args = typing.get_args(field.annotation)
    return str in (field.annotation, *args, *(a for arg in args for a in typing.get_args(arg)))


def _json_value(text: str) -> Any:
    """A form field of a number, boolean or object holds its JSON (`3`, `true`, `{...}`), as the document's
    types say; text that is no JSON stays text, which the model then refuses by name."""
    try:
        return json.loads(text)
    except ValueError:
        return text


async def parse_body(request: Request, model: type[Body], settings: Settings) -> Parsed[Body]:
    """The body as `model`, plus the uploaded files by field name (multipart only)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, list[UploadFile]] = {}
    if content_type == "multipart/form-data":
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=1000)
        data: dict[str, Any] = {}
        for name in form.keys():
            values = form.getlist(name)
            uploads = [v for v in values if isinstance(v, StarletteUploadFile)]
            texts = [v for v in values if isinstance(v, str)]
            if uploads:
                files[name] = uploads
            if texts and not _is_list(model, name) and texts[-1] == "":
                continue  # an empty form field is one left blank: not given (as a browser's form sends it)
            if texts:
                value = texts if _is_list(model, name) else texts[-1]
                if not _takes_text(model, name):
                    value = [_json_value(v) for v in value] if isinstance(value, list) else _json_value(value)
                data[name] = value
    elif content_type in ("application/json", ""):
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise bad_request("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise unprocessable("the body must be a JSON object")
    else:
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    return Parsed(model.model_validate(data), files, settings)


def parsed(model: type[Body]) -> Any:
    """`Depends` on the request body as `model` (JSON or multipart; FastAPI cannot declare both itself)."""

    async def dependency(request: Request, settings: SettingsDep) -> Parsed[Body]:
        return await parse_body(request, model, settings)

    return Depends(dependency)


CaptionInput = Annotated[Parsed[schemas.CaptionRequest], parsed(schemas.CaptionRequest)]
VqaInput = Annotated[Parsed[schemas.VqaRequest], parsed(schemas.VqaRequest)]
GenerateInput = Annotated[Parsed[schemas.GenerateRequest], parsed(schemas.GenerateRequest)]
EmbedInput = Annotated[Parsed[schemas.EmbedRequest], parsed(schemas.EmbedRequest)]
RetrieveInput = Annotated[Parsed[schemas.RetrieveRequest], parsed(schemas.RetrieveRequest)]
