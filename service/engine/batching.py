"""The request batcher: concurrent requests share one model call.

- A request that finds the server idle runs at once (no idle waiting at low load, unlike a fixed delay).
- Under load, a batch takes every waiting request with the same batch key (each job knows its own: task +
  generation settings) up to `max_batch_size`, and waits at most `max_wait_s` after its first request.
- Requests with different keys never share a batch: beam width or sampling settings belong to the call.
- The model runs on one worker thread, so the event loop keeps answering /health, /metrics and new requests.
- The queue is bounded (QueueFull -> 429); each request has a deadline (DeadlineExceeded -> 504); a request
  whose client left or whose deadline passed is dropped on the worker thread right before compute.
- One request never fails another: when a batch's model call raises, its halves are run again, recursively,
  until the request(s) at fault are alone; the others get their answers. One poisoned request in a batch of
  n costs about 2*log2(n) extra calls; a batch that fails whatever the split (a dead device) stops at a bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("service.batching")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the request queue is full")
        self.retry_after_s = retry_after_s


class BatcherStopped(Exception):
    """The batcher no longer takes work (draining or shut down)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its result was ready."""


class InvalidInput(Exception):
    """The request's own input cannot be run (422); the message is shown to the client, so it says nothing
    internal. The model runner raises it, or returns it as one request's result."""


class Job(Protocol):
    """What the batcher needs of a job (service.engine.jobs has the real ones)."""

    task: str  # for metrics: "generate", "embed", ...

    @property
    def batch_key(self) -> Hashable: ...


@dataclass(eq=False)
class WorkItem:
    job: Job
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # written by the event loop, read by the worker thread just before compute
    batch_size: int = 0

    def dead(self, now: float) -> str | None:
        """Why nobody waits for this result any more, or None."""
        if self.cancelled:
            return "disconnected"
        return "deadline" if now >= self.deadline else None


class BatcherMetrics:
    """Hooks the batcher reports through; the default does nothing (metrics.Metrics implements them)."""

    def queue_depth(self, depth: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, task: str, size: int, seconds: float) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def isolated(self, extra_calls: int, failed: int) -> None: ...


# The model: jobs of one batch key in, one result (or exception) per job out.
RunBatch = Callable[[list[Job]], list[Any]]


def isolation_budget(size: int) -> int:
    """Model calls allowed to split a failed batch of `size`: enough to isolate two requests at fault
    anywhere in it (each costs 2 calls per halving), so a batch failing whatever the split cannot loop."""
    return 4 * math.ceil(math.log2(size)) if size > 1 else 0


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        metrics: BatcherMetrics | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._metrics = metrics or BatcherMetrics()
        self._queue: collections.deque[WorkItem] = collections.deque()
        # One thread: one model call at a time, and torch's intra-op threads do the parallel work.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-model")
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._current: list[WorkItem] = []  # the batch on the model thread
        self._last_batch_size = 0
        self._mean_batch_seconds = 0.5
        self.accepting = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def _running(self) -> int:
        return len(self._current)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._running > 0

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="blip2-batcher")
        self.accepting = True

    async def stop(self) -> None:
        self.accepting = False
        running = list(self._current)  # the loop's `finally` forgets it once cancelled
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Whatever is queued, and a batch whose result the cancelled loop will not deliver, fails now.
        for item in [*self._queue, *running]:
            if not item.future.done():
                item.future.set_exception(BatcherStopped("the server is shutting down"))
        self._queue.clear()
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    def retry_after_s(self) -> int:
        """A hint for clients refused with 429: how long the queue ahead takes to clear, at least 1 s."""
        batches = len(self._queue) / self.max_batch_size + 1
        return max(1, round(batches * self._mean_batch_seconds))

    async def submit(self, job: Job, timeout_s: float, meta: dict | None = None) -> Any:
        """Queue one request and wait for its result. Cancelling the caller drops the request.

        `meta`, when given, receives the size of the batch the request ran in (for the request log)."""
        if not self.accepting:
            raise BatcherStopped("the server is not taking requests")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(self.retry_after_s())
        loop = asyncio.get_running_loop()
        item = WorkItem(job, time.monotonic() + timeout_s, loop.create_future())
        self._queue.append(item)
        self._metrics.queue_depth(len(self._queue))
        self._arrived.set()
        try:
            result = await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
            if meta is not None:
                meta["batch_size"] = item.batch_size
            return result
        except TimeoutError:
            item.deadline = 0.0  # marks it dead for the worker, as a deadline drop
            raise DeadlineExceeded(f"no result within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            item.cancelled = True
            raise

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take()
            if not batch:
                continue
            if len(batch) < self.max_batch_size and (self._queue or self._last_batch_size > 1):
                # Under load: let the batch fill up, but never wait past max_wait after its first request.
                await self._fill(batch)
            self._metrics.queue_depth(len(self._queue))
            self._current = batch
            try:
                await self._run(batch)
            except Exception:  # the loop must survive anything a batch does
                log.exception("batch failed")
            finally:
                self._current = []

    def _live(self, items) -> list[WorkItem]:
        """The items someone still waits for; the others are counted as dropped, by reason."""
        now = time.monotonic()
        live = []
        for item in items:
            reason = item.dead(now)
            if reason:
                self._metrics.dropped(reason)
            else:
                live.append(item)
        return live

    def _take(self, key: Hashable | None = None, limit: int | None = None) -> list[WorkItem]:
        """Remove up to `limit` live requests with the head's key (or `key`) from the queue, in order."""
        self._queue = collections.deque(self._live(self._queue))
        if not self._queue:
            return []
        key = self._queue[0].job.batch_key if key is None else key
        limit = self.max_batch_size if limit is None else limit
        taken, kept = [], collections.deque()
        for item in self._queue:
            (taken if item.job.batch_key == key and len(taken) < limit else kept).append(item)
        self._queue = kept
        return taken

    async def _fill(self, batch: list[WorkItem]) -> None:
        until = batch[0].enqueued + self.max_wait_s
        while len(batch) < self.max_batch_size:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            batch.extend(self._take(batch[0].job.batch_key, self.max_batch_size - len(batch)))
            if len(batch) >= self.max_batch_size:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _run(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for item in batch:
            self._metrics.queue_wait(started - item.enqueued)
        live, outcome = await loop.run_in_executor(self.executor, self._compute, batch)
        seconds = time.monotonic() - started
        self._last_batch_size = len(live)
        if live:
            self._mean_batch_seconds = 0.8 * self._mean_batch_seconds + 0.2 * seconds
        for item, result in zip(live, outcome, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _compute(self, batch: list[WorkItem]) -> tuple[list[WorkItem], list[Any]]:
        """On the worker thread: drop requests nobody waits for any more, then run the rest together."""
        live = self._live(batch)
        if not live:
            return [], []
        for item in live:
            item.batch_size = len(live)
        started = time.perf_counter()
        results = self._isolating([item.job for item in live])
        self._metrics.batch(live[0].job.task, len(live), time.perf_counter() - started)
        return live, results

    def _isolating(self, jobs: list[Job]) -> list[Any]:
        """Results of one batch; when its call raises, the halves run again (recursively) so that only the
        request(s) at fault get the error, within `isolation_budget` extra calls."""
        budget = isolation_budget(len(jobs))
        calls = 0

        def run(part: list[Job]) -> list[Any]:
            nonlocal budget, calls
            calls += 1
            try:
                return self._run_batch(part)
            except Exception as exc:
                if len(part) > 1 and budget >= 2:
                    budget -= 2
                    log.warning(
                        "model call failed for a batch of %d (%r): running its halves", len(part), exc
                    )
                    half = len(part) // 2
                    return run(part[:half]) + run(part[half:])
                if not isinstance(exc, InvalidInput):  # a client's mistake is no server error
                    log.error("model call failed for %d request(s)", len(part), exc_info=exc)
                return [exc] * len(part)

        results = run(jobs)
        if calls > 1:
            self._metrics.isolated(calls - 1, sum(isinstance(result, Exception) for result in results))
        return results
