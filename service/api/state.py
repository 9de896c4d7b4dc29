"""The server's state, typed: one object on `app.state.server`, read by the routes through service.api.deps."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.api.metrics import Metrics
from service.engine.batching import Batcher
from service.engine.gallery import Gallery
from service.engine.inference import Runner
from service.engine.tasks import TaskProfiles
from service.settings import Settings


class Phase(str, enum.Enum):
    LOADING = "loading"  # models loading and warming up: /health 200, /ready 503
    READY = "ready"
    DRAINING = "draining"  # after SIGTERM: requests in flight finish, new ones get 503
    FAILED = "failed"  # loading failed: /health 503, the process exits 1


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    phase: Phase = Phase.LOADING
    load_error: str | None = None
    on_load_failure: Callable[[], None] | None = None  # set by __main__: stop the process
    runner: Runner | None = None
    tasks: TaskProfiles | None = None  # the generation routes' task profiles, with a generation model
    batcher: Batcher | None = None
    gallery: Gallery | None = None  # the persistent image gallery, when BLIP2_GALLERY_DIR is set
    working: int = 0  # HTTP requests in flight (probes and scrapes not counted)
    started: int = field(default_factory=lambda: int(time.time()))
