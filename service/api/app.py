"""The application: `create_app(settings)`.

Start-up loads and warms the models in the background, so /health answers while a large checkpoint
loads and /ready says yes only when the first request will be fast. On SIGTERM (see __main__.py),
`drain()` turns /ready to 503 and refuses new work, waits for the requests in flight, then the server exits.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import api_docs, chat, gallery_routes, openapi, page, routes
from service.api.errors import error_body, install_handlers, too_large
from service.api.state import Phase, ServerState
from service.engine.batching import Batcher
from service.engine.gallery import open_gallery
from service.engine.inference import Runner
from service.engine.loading import load_models
from service.engine.tasks import task_profiles
from service.engine.vision import VisionCache
from service.settings import Settings

log = logging.getLogger("service.app")
access_log = logging.getLogger("service.access")
OPEN_PATHS = {"/health", "/ready", "/metrics"}  # probes and scrapers carry no API key
MULTI_IMAGE_PATHS = {"/embed", "/retrieve", "/gallery/images"}


async def _load(app: FastAPI) -> None:
    state: ServerState = app.state.server
    try:
        models = await asyncio.to_thread(load_models, state.settings)
        for name, seconds in models.load_seconds.items():
            state.metrics.load_seconds.labels(name).set(seconds)
        state.gallery = await asyncio.to_thread(_open_gallery, state.settings, models)
        vision_cache = VisionCache(state.settings.vision_cache_size, state.metrics.vision)
        runner = Runner(
            models,
            vision_cache,
            state.settings.decoder,
            state.settings.cuda_graphs,
            kv_cache_max_mb=state.settings.kv_cache_max_mb,
        )
        batcher = Batcher(
            runner,
            max_batch_size=state.settings.max_batch_size,
            max_wait_s=state.settings.max_wait_ms / 1000,
            max_queue_size=state.settings.max_queue_size,
            metrics=state.metrics,
        )
        if state.settings.warmup:
            await asyncio.get_running_loop().run_in_executor(batcher.executor, runner.warm_up)
        # What is loaded now lives as long as the server, so the cyclic GC stops walking it: a full collection
        # walked the models' ~500k objects, ~280 ms with every thread stalled, about every 10 s under load
        # (c=32 /caption, built-in model), and set the p99; now one takes ~2 ms.
        gc.collect()
        gc.freeze()
        batcher.start()
        if models.generation is not None:
            state.tasks = task_profiles(models.generation, state.settings)
        state.runner, state.batcher = runner, batcher
        if state.phase == Phase.LOADING:  # a SIGTERM during loading keeps the server draining
            state.phase = Phase.READY
            state.metrics.ready.set(1)
            log.info("ready")
    except Exception as exc:  # an operator's mistake (bad path, wrong folder): say it and stay unhealthy
        state.phase, state.load_error = Phase.FAILED, str(exc)
        log.error(
            "model loading failed: %s", exc, exc_info=not isinstance(exc, (OSError, ValueError, RuntimeError))
        )
        if state.on_load_failure is not None:
            state.on_load_failure()


def _open_gallery(settings: Settings, models):
    """The gallery BLIP2_GALLERY_DIR names, checked against the retrieval model; a refusal fails the start."""
    if settings.gallery_dir is None:
        return None
    if models.retrieval is None:  # the /gallery routes then answer 501 as /embed does
        log.warning("BLIP2_GALLERY_DIR is set but no retrieval model is loaded: the gallery is off")
        return None
    return open_gallery(settings, models.retrieval.model)


async def drain(app: FastAPI, timeout_s: float | None = None) -> bool:
    """Refuse new work, then wait for the requests in flight; True when all finished in time."""
    state: ServerState = app.state.server
    # New requests are refused where each route starts (its runner dependency sees DRAINING). The batcher
    # keeps taking work, so a request already past that check (reading its body, decoding its image) is
    # served, not refused with 503 while in flight.
    state.phase = Phase.DRAINING
    state.metrics.ready.set(0)
    deadline = time.monotonic() + (state.settings.drain_timeout_s if timeout_s is None else timeout_s)
    while state.working > 0 or (state.batcher is not None and state.batcher.busy):
        if time.monotonic() >= deadline:
            log.warning("drain timed out with %d requests in flight", state.working)
            return False
        await asyncio.sleep(0.05)
    log.info("drained")
    return True


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(app))
        yield
        loading.cancel()
        if app.state.server.batcher is not None:
            await app.state.server.batcher.stop()
        if app.state.server.gallery is not None:
            await asyncio.to_thread(app.state.server.gallery.close)
        gc.unfreeze()  # an app made and stopped in a longer process (tests) leaves it collectable

    app = FastAPI(
        title="BLIP-2 inference server",
        description="Captioning, VQA, prompted generation, embeddings and retrieval with BLIP-2 models.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs is service/api/api_docs.py's: FastAPI's loads Swagger UI from a CDN
        redoc_url=None,
    )
    state = app.state.server = ServerState(settings)
    install_handlers(app)
    openapi.install(app, settings)
    routers = (routes.router, chat.router, page.router, api_docs.router, gallery_routes.router)
    for router in routers:
        app.include_router(router)
    known_paths = {route.path for router in routers for route in router.routes}
    known_paths |= {"/openapi.json"}
    app.add_middleware(Gatekeeper, settings=settings, app_state=state, known_paths=known_paths)
    return app


class Gatekeeper:
    """Pure ASGI middleware (BaseHTTPMiddleware would break disconnect detection): API key, body size
    cap, in-flight count, metrics and one structured log line per request."""

    def __init__(self, app, settings: Settings, app_state: ServerState, known_paths: set[str]) -> None:
        self.app, self.settings, self.state, self.known_paths = app, settings, app_state, known_paths
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self.expected = f"Bearer {key}".encode() if key else None
        # Room for the images a route may carry, base64-inflated, plus its text fields.
        one = settings.max_image_bytes * 4 // 3 + 1024 * 1024
        self.max_body = {path: one * settings.max_images_per_request for path in MULTI_IMAGE_PATHS}
        self.max_body_default = one

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        refusal = None
        # The page's own files are open too, and the API reference (service/api/page.py and service/api/api_docs.py
        # say why); the API they call is not.
        if self.expected is not None and path not in OPEN_PATHS | page.PUBLIC_PATHS | api_docs.PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time; the key is never logged
                message = "a valid `Authorization: Bearer <key>` header is required"
                refusal = error_body(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
        limit = self.max_body.get(path, self.max_body_default)
        declared = headers.get(b"content-length", b"0")
        if refusal is None and (not declared.isdigit() or int(declared) > limit):
            # Refused before a byte of the body is read.
            refusal = error_body(413, "payload_too_large", f"the body is over {limit} bytes")

        counted = path not in OPEN_PATHS
        status, received, started = 500, 0, time.perf_counter()

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # chunked uploads come without a Content-Length
                raise too_large(f"the body is over {limit} bytes")
            return message

        async def tracked_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.state.phase == Phase.DRAINING:
                    # Close each connection after its answer: a client that reused a keep-alive connection
                    # would otherwise race the final shutdown and see its next request cut off (ReadError).
                    headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        if counted:
            self.state.working += 1
            self.state.metrics.in_flight.inc()
        try:
            if refusal is not None:
                await refusal(scope, receive, tracked_send)
            else:
                await self.app(scope, capped_receive, tracked_send)
        finally:
            if counted:
                self.state.working -= 1
                self.state.metrics.in_flight.dec()
            self._record(scope, path, status, time.perf_counter() - started)

    def _record(self, scope, path: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        # Refused before routing (401, 413): the path itself when it is a route; never an unbounded label.
        label = getattr(route, "path", None) or (path if path in self.known_paths else "other")
        metrics = self.state.metrics
        metrics.requests.labels(label, str(status)).inc()
        metrics.request_seconds.labels(label).observe(seconds)
        if path in OPEN_PATHS:
            return  # probes and scrapes would drown the log
        line = {"route": label, "method": scope["method"], "status": status, "latency_s": round(seconds, 4)}
        extra = scope.get("state", {})
        if "batch_size" in extra:
            line["batch_size"] = extra["batch_size"]
        if self.settings.log_prompts and "prompt" in extra:
            line["prompt"] = extra["prompt"]
        access_log.info(json.dumps(line))
