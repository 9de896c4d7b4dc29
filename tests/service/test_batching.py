"""The request batcher (service/engine/batching.py) on its own, with a plain function as the model: batch sizes,
per-item errors, isolating the request at fault in a failed batch, shutdown. (Batching through the HTTP
routes is in test_app_batching.py.)"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest

from service.engine.batching import (
    Batcher,
    BatcherMetrics,
    BatcherStopped,
    InvalidInput,
    QueueFull,
    isolation_budget,
)


@dataclass(frozen=True)
class Item:
    """A job as the batcher sees one: a batch key and a value."""

    batch_key: str
    value: object
    task: ClassVar[str] = "test"


class Recorder:
    """A stand-in model: echoes values, records each batch; value "boom" yields a per-item error."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list]] = []

    def __call__(self, jobs):
        key = jobs[0].batch_key
        self.batches.append((key, [job.value for job in jobs]))
        return [ValueError("boom") if job.value == "boom" else (key, job.value) for job in jobs]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_idle_request_runs_at_once_even_with_a_long_wait():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=8, max_wait_s=600, max_queue_size=4)
        batcher.start()
        result = await batcher.submit(
            Item("k", 1), timeout_s=30
        )  # would hit the 30 s deadline if it waited 600 s
        await batcher.stop()
        return result, recorder.batches

    assert run(scenario()) == (("k", 1), [("k", [1])])


def test_batches_fill_up_to_the_limit_and_split_by_key():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0.001, max_queue_size=32)
        batcher.start()
        gate = threading.Event()
        batcher.executor.submit(gate.wait)  # the model thread is busy: everything queues
        primer = asyncio.ensure_future(batcher.submit(Item("p", 0), 60))
        await asyncio.sleep(0)
        while batcher._running == 0:
            await asyncio.sleep(0.001)
        jobs = [asyncio.ensure_future(batcher.submit(Item("a" if i % 3 else "b", i), 60)) for i in range(10)]
        while batcher.depth < 10:
            await asyncio.sleep(0.001)
        gate.set()
        results = await asyncio.gather(primer, *jobs)
        await batcher.stop()
        return results, recorder.batches

    results, batches = run(scenario())
    assert results[1:] == [("a" if i % 3 else "b", i) for i in range(10)]
    sizes = [(key, len(items)) for key, items in batches]
    assert sizes[0] == ("p", 1)
    assert sorted(sizes[1:]) == [("a", 2), ("a", 4), ("b", 4)]  # a: 6 items in 4 + 2, b: 4 items
    assert all(len(items) <= 4 for _, items in batches)


def test_a_failing_item_fails_alone_and_a_full_queue_refuses():
    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=4, max_wait_s=0, max_queue_size=1)
        batcher.start()
        gate = threading.Event()
        batcher.executor.submit(gate.wait)
        first = asyncio.ensure_future(batcher.submit(Item("k", "boom"), 60))
        while batcher._running == 0:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(batcher.submit(Item("k", "fine"), 60))
        while batcher.depth < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull):
            await batcher.submit(Item("k", "third"), 60)
        gate.set()
        outcome = await asyncio.gather(first, second, return_exceptions=True)
        await batcher.stop()
        with pytest.raises(BatcherStopped):
            await batcher.submit(Item("k", "late"), 60)
        return outcome

    failed, fine = run(scenario())
    assert isinstance(failed, ValueError) and fine == ("k", "fine")


def test_stop_answers_every_waiting_request():
    """Queued requests and the batch in flight get BatcherStopped (503) instead of waiting forever."""

    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=1, max_wait_s=0, max_queue_size=8)
        batcher.start()
        gate = threading.Event()
        batcher.executor.submit(gate.wait)
        jobs = [asyncio.ensure_future(batcher.submit(Item("k", i), 60)) for i in range(3)]
        while batcher.depth < 2:
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        return await asyncio.gather(*jobs, return_exceptions=True)

    outcome = run(scenario())
    assert all(isinstance(o, BatcherStopped) for o in outcome)


class Poisoned:
    """A stand-in model whose whole call raises when one payload is poison (as an out-of-range token id
    does inside a real batch); counts its calls."""

    def __init__(self, poison=("boom",), error=IndexError) -> None:
        self.poison, self.error, self.calls = poison, error, []

    def __call__(self, jobs):
        values = [job.value for job in jobs]
        self.calls.append(values)
        if any(v in self.poison for v in values):
            raise self.error("index out of range in self")
        return [(job.batch_key, v) for job, v in zip(jobs, values, strict=True)]


class CountingMetrics(BatcherMetrics):
    def __init__(self) -> None:
        self.isolations: list[tuple[int, int]] = []

    def isolated(self, extra_calls: int, failed: int) -> None:
        self.isolations.append((extra_calls, failed))


def one_batch(model, payloads, metrics=None):
    """Every payload queued while the model thread is busy, so they all run as one batch."""

    async def scenario():
        batcher = Batcher(
            model, max_batch_size=len(payloads), max_wait_s=0, max_queue_size=64, metrics=metrics
        )
        batcher.start()
        gate = threading.Event()
        batcher.executor.submit(gate.wait)
        jobs = [asyncio.ensure_future(batcher.submit(Item("k", p), 60)) for p in payloads]
        while batcher.depth + batcher._running < len(payloads):
            await asyncio.sleep(0.001)
        gate.set()
        outcome = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return outcome

    return run(scenario())


@pytest.mark.parametrize("position", [0, 7, 15])
def test_one_poisoned_request_fails_alone_within_log2_calls(position):
    payloads = [f"q{i}" for i in range(16)]
    payloads[position] = "boom"
    model, metrics = Poisoned(), CountingMetrics()
    outcome = one_batch(model, payloads, metrics)
    assert len(model.calls[0]) == 16  # one batch, then halves of it
    assert len(model.calls) <= 2 * math.log2(16) + 1
    assert isinstance(outcome[position], IndexError)
    assert [o for i, o in enumerate(outcome) if i != position] == [("k", p) for p in payloads if p != "boom"]
    assert metrics.isolations == [(len(model.calls) - 1, 1)]


def test_two_poisons_are_both_found_and_a_batch_that_always_fails_stops_at_the_bound():
    payloads = [f"q{i}" for i in range(16)]
    payloads[2] = payloads[11] = "boom"
    outcome = one_batch(Poisoned(), payloads)
    assert [i for i, o in enumerate(outcome) if isinstance(o, Exception)] == [2, 11]

    everything = [f"q{i}" for i in range(16)]
    dead = Poisoned(poison=everything, error=RuntimeError)  # every call fails: e.g. the device is gone
    outcome = one_batch(dead, everything)
    assert all(isinstance(o, RuntimeError) for o in outcome)
    assert len(dead.calls) == 1 + isolation_budget(16)  # bounded, far from one call per request


def test_invalid_input_keeps_its_type_for_a_4xx():
    """The runner marks a request's own fault as InvalidInput: per item, or raised for the batch."""
    outcome = one_batch(Poisoned(error=InvalidInput), ["a", "boom", "b", "c"])
    assert isinstance(outcome[1], InvalidInput) and outcome[0] == ("k", "a")
