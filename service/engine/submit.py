"""A job into the engine: its images prepared off the model thread, then queued on the batcher."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from service.engine.batching import Batcher
from service.engine.inference import Runner

log = logging.getLogger("service.submit")


async def prepare_and_submit(runner: Runner, batcher: Batcher, job: Any, timeout_s: float, meta: dict) -> Any:
    """The job's result once a batch ran it; `meta` receives its batch size (Batcher.submit)."""
    # The job's images are resized and normalised here, on a worker thread, while the model thread runs
    # other batches (on the model thread, real-size photos would cost it milliseconds per image).
    try:
        await asyncio.to_thread(runner.prepare, job)
    except Exception:
        log.exception("preparing a request's images failed")
        raise
    return await batcher.submit(job, timeout_s, meta)
