"""One error format for every failure: `{"error": {"type": ..., "message": ...}}` with the right status. The
only place an engine error (service.engine raises no HTTP error) becomes an HTTP status.

A client's mistake is never a 500: validation -> 422, bad image -> 400, too large -> 413. Only a bug or
a failing model call is a 500, and its message says nothing internal.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.engine.batching import BatcherStopped, DeadlineExceeded, InvalidInput, QueueFull
from service.engine.images import ImageTooLarge, InvalidImage

log = logging.getLogger("service.errors")
HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def invalid_image(message: str) -> ApiError:
    return ApiError(400, "invalid_image", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "payload_too_large", message)


def unprocessable(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def unavailable(message: str, retry_after_s: int = 5) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": str(retry_after_s)})


def model_not_loaded(what: str, setting: str) -> ApiError:
    return ApiError(501, "model_not_loaded", f"this server has no {what} loaded; start it with {setting}")


def client_closed() -> ApiError:
    return ApiError(499, "client_closed_request", "the client closed the connection")


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "the server failed to answer this request")


# What the engine refuses as the request's own fault, and the error each is answered with.
REFUSALS = {InvalidInput: unprocessable, InvalidImage: invalid_image, ImageTooLarge: too_large}


def refusal(exc: InvalidInput | InvalidImage | ImageTooLarge) -> ApiError:
    """The HTTP error of an engine's refusal (its message is the client's to read)."""
    return REFUSALS[type(exc)](str(exc))


def error_body(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _validation_message(errors: list) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path answers. Starlette's 405 names only the first route that matched the
    path, and a path served by several routes (GET and DELETE /gallery/images/{id}) has more."""
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.routes
        )
    ]


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_body(exc.status, exc.type, exc.message, exc.headers)

    async def _refused(request: Request, exc: InvalidInput | InvalidImage | ImageTooLarge) -> JSONResponse:
        return await _api_error(request, refusal(exc))

    for refused in REFUSALS:
        app.add_exception_handler(refused, _refused)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_body(422, "invalid_request", _validation_message(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return error_body(422, "invalid_request", _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_body(exc.status_code, kind, str(exc.detail), headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return error_body(429, "overloaded", "the server is at capacity; retry later", headers)

    @app.exception_handler(BatcherStopped)
    async def _stopped(_: Request, exc: BatcherStopped) -> JSONResponse:
        return error_body(503, "unavailable", str(exc), {"Retry-After": "5"})

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(_: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_body(504, "timeout", f"the request took too long: {exc}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return error_body(500, "internal_error", "the server failed to answer this request")
