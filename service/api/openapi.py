"""The OpenAPI document (/openapi.json): what every route answers, and what a request must hold.

One place declares the error answers (`error_responses`, from the statuses a route can answer), and one
declares the bodies the routes read themselves from JSON or multipart (`request_body`: FastAPI can declare
only one content type). `install` finishes the document per server: the request models go into
`components/schemas` (nested definitions hoisted, so every `$ref` resolves), the bounds the settings set
(longest prompt, most tokens, most images...) become `maxLength`/`maximum`/`maxItems`, and a server with an
API key says so (a bearer scheme). A request the document allows is then one the server accepts, except what
JSON Schema cannot say: that the bytes of an image decode, and how many tokens a text makes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api.schemas import ErrorBody
from service.settings import Settings

REF = "#/components/schemas/{model}"
# A string that holds an image: base64, a `data:image/...;base64,` URI, or an http(s) URL on an allowed host.
IMAGE_FORMAT = "image"
# A multipart file part holding an image (service/engine/images.py decodes what Pillow reads).
FILE = {"type": "string", "format": "binary", "contentMediaType": "image/*"}

# status -> (when, error.type, an example message)
ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("The body is not valid JSON, or an image does not decode.", "invalid_image",
          "cannot decode the image: not a supported image format"),
    401: ("The server has an API key and the request lacks `Authorization: Bearer <key>`.", "unauthorized",
          "a valid `Authorization: Bearer <key>` header is required"),
    404: ("No image with this id in the gallery.", "not_found", "no image 'shop-1' in the gallery"),
    409: ("Every image was refused, the first because its id holds other bytes.", "conflict",
          "images.0: id 'shop-1' holds another image; delete it first"),
    413: ("The body, or an image, is over the server's size limit.", "payload_too_large",
          "the body is over 22369621 bytes"),
    415: ("The body is neither application/json nor multipart/form-data.", "unsupported_media_type",
          "send application/json or multipart/form-data"),
    422: ("The request is well formed but not acceptable: a field out of bounds or missing, or a prompt longer "
          "than the model's positions.", "invalid_request",
          "image: an image is required (JSON field `image` or multipart file `image`)"),
    429: ("The queue is full; retry after `Retry-After` seconds.", "overloaded",
          "the server is at capacity; retry later"),
    500: ("The server failed (a bug or a failing model call); the message says nothing internal.",
          "internal_error", "the server failed to answer this request"),
    501: ("The model (or gallery) this route needs is not configured on this server.", "model_not_loaded",
          "this server has no retrieval model loaded; start it with --retrieval-model (BLIP2_RETRIEVAL_MODEL)"),
    503: ("The model is loading, failed to load, or the server is shutting down; retry after `Retry-After`.",
          "unavailable", "the model is still loading"),
    504: ("The request waited or ran past its deadline.", "timeout", "the request took too long: queued 30.0 s"),
}  # fmt: skip
RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}

# The statuses routes share, named once: a route lists the groups it belongs to.
API = (401, 500)  # every route behind the API key
BODY = (400, 413, 415, 422)  # a body read from JSON or multipart
MODEL = (429, 501, 503, 504)  # work queued on a model
PROBE = (503,)
GALLERY = (*API, 501, 503)  # the /gallery routes' dependencies: the retrieval model and the gallery
IMAGE_ID = (404, 422)  # a route of one gallery image: not there, or not a valid id


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for the error statuses a route can answer, each with the error body and an example."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        when, type_, message = ERRORS[status]
        out[status] = {
            "model": ErrorBody,
            "description": when,
            "content": {"application/json": {"example": {"error": {"type": type_, "message": message}}}},
        }
        if status in HEADERS:
            out[status]["headers"] = HEADERS[status]
    return out


# -- request bodies ----------------------------------------------------------------------------------
BODY_MODELS: dict[str, type[BaseModel]] = {}  # what `install` puts into components/schemas
# likewise, schemas that are no model (a recursive one needs a name)
NAMED_SCHEMAS: dict[str, dict[str, Any]] = {}
NAMED = "x-named-schema"  # marks where a named schema goes in a model's schema, until `build` writes the $ref


def named_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Keep `schema` in components/schemas as `name`, and return what refers to it in a model's schema: a mark,
    as pydantic follows every `$ref` it is given and knows only its own. `schema` itself, which pydantic never
    reads, refers to itself with `{"$ref": REF.format(model=name)}`."""
    NAMED_SCHEMAS[name] = schema
    return {NAMED: name}


def _named_as_refs(node: Any) -> Any:
    """The document with each mark of `named_schema` made a `$ref`."""
    if isinstance(node, dict):
        if NAMED in node:
            return {"$ref": REF.format(model=node[NAMED])}
        return {key: _named_as_refs(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_named_as_refs(value) for value in node]
    return node


def request_body(
    model: type[BaseModel],
    files: dict[str, str],
    required: list[str] | None = None,
    omit: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`openapi_extra` for a route whose body service.api.deps.parsed reads: JSON as `model`, or multipart with the
    same fields, where `files` names the image fields sent as file parts ("one" or "many" each).

    The multipart schema has no oneOf/anyOf (validators cannot judge a file part against alternatives), so a
    route whose JSON has alternatives documents one form of them for multipart: `required` (default: the
    JSON's) and without the fields in `omit`."""
    BODY_MODELS[model.__name__] = model
    schema = model.model_json_schema(ref_template=REF)
    required = schema.get("required", []) if required is None else required
    properties = {
        name: _as_file_part(prop, files.get(name), name in required)
        for name, prop in schema.get("properties", {}).items()
        if name not in omit
    }
    multipart = {
        "title": model.__name__,
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        "description": "The JSON body's fields as form fields (numbers, booleans and objects as their JSON text); "
        "images as file parts (" + ", ".join(f"`{name}`" for name in files if name in properties) + ").",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


def _as_file_part(prop: dict[str, Any], kind: str | None, required: bool) -> dict[str, Any]:
    """A multipart field: an image field as file parts, any other as its non-null JSON schema (a form field
    has no null: leaving it out is what unsets it)."""
    if kind == "one":
        return FILE | {"description": "The image file."}
    if kind == "many":
        files = {k: v for k, v in prop.items() if k not in ("items", "anyOf", "default")}
        return files | {"type": "array", "items": FILE} | ({"minItems": 1} if required else {})
    options = [option for option in prop.get("anyOf", []) if option.get("type") != "null"]
    if len(options) == 1:
        prop = options[0] | {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    if required and prop.get("type") == "string":  # a blank form field is one not given (service.api.deps)
        prop = {"minLength": 1} | prop
    return prop


# -- the document ------------------------------------------------------------------------------------
def _bounds(settings: Settings) -> dict[str, dict[str, Any]]:
    """Request fields by name -> the keywords the server's settings bound them with (checked in the routes)."""
    text = {"maxLength": settings.max_prompt_chars}
    return {
        "prompt": text,
        "question": text,
        "text": text,
        "prompt_template": text,
        "content": text,
        "max_new_tokens": {"maximum": settings.max_new_tokens_limit},
        "max_tokens": {"maximum": settings.max_new_tokens_limit},
        "max_completion_tokens": {"maximum": settings.max_new_tokens_limit},
        "num_beams": {"maximum": settings.max_num_beams},
        "images": {"maxItems": settings.max_images_per_request},
        "texts": {"maxItems": settings.max_retrieve_candidates, "items": text},
        "SearchRequest.top_k": {"maximum": settings.gallery_max_top_k},
    }


KEYWORD_TYPE = {"maxLength": "string", "maximum": "integer", "maxItems": "array"}


def _bound(schema: dict[str, Any], bounds: dict[str, dict[str, Any]]) -> None:
    """Add the settings' bounds to the properties they name (`Model.field` before `field`), on the options of
    the type each keyword bounds."""
    for name, prop in schema.get("properties", {}).items():
        wanted = bounds.get(f"{schema.get('title')}.{name}", bounds.get(name, {}))
        for option in prop.get("anyOf", [prop]):
            for keyword, value in wanted.items():
                if keyword == "items" and option.get("type") == "array" and "$ref" not in option["items"]:
                    option["items"].update(value)
                elif option.get("type") == KEYWORD_TYPE.get(keyword):
                    option[keyword] = value


def _refs(node: Any) -> set[str]:
    """The component names a part of the document refers to."""
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def build(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The whole document for this server."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(model, "validation") for model in BODY_MODELS.values()], ref_template=REF)
    schemas.update(defs.get("$defs", {}))
    schemas.update(NAMED_SCHEMAS)
    doc = _named_as_refs(doc)
    schemas = doc["components"]["schemas"]
    bounds = _bounds(settings)
    bodies = [media["schema"] for path in doc["paths"].values() for operation in path.values()
              for media in operation.get("requestBody", {}).get("content", {}).values()]  # fmt: skip
    request_side, todo = set(), _refs(bodies)
    while todo:  # what the request bodies refer to, and what that refers to
        name = todo.pop()
        request_side.add(name)
        todo |= _refs(schemas[name]) - request_side
    for schema in [*bodies, *(schemas[name] for name in request_side)]:
        _bound(schema, bounds)
        for prop in schema.get("properties", {}).values():
            if prop.get("default", 0) is None and prop.get("type") not in (None, "null"):
                del prop["default"]  # a field the document types as never null: null is the model's "unset"
    if settings.api_key is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in doc["paths"].values():
            for operation in path.values():
                if "401" in operation.get("responses", {}):
                    operation["security"] = [{"bearer": []}]
    return doc


def install(app: FastAPI, settings: Settings) -> None:
    """Serve `build`'s document at /openapi.json (made once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, settings)
        return app.openapi_schema

    app.openapi = openapi
