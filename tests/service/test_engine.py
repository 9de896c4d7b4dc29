"""The batching engine on its own, with a plain function as the model: batch sizes, per-item errors,
isolating the request at fault in a failed batch, shutdown. (The HTTP-level behaviour is in test_batching.py.)"""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from service.batching import (
    Engine,
    EngineMetrics,
    EngineStopped,
    InvalidInput,
    QueueFull,
    isolation_budget,
)


class Recorder:
    """A stand-in model: echoes payloads, records each batch; payload "boom" yields a per-item error."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list]] = []

    def __call__(self, key, payloads):
        self.batches.append((key, list(payloads)))
        return [ValueError("boom") if p == "boom" else (key, p) for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_idle_request_runs_at_once_even_with_a_long_wait():
    async def scenario():
        recorder = Recorder()
        engine = Engine(recorder, max_batch_size=8, max_wait_s=600, max_queue_size=4)
        engine.start()
        result = await engine.submit("k", 1, timeout_s=30)  # would hit the 30 s deadline if it waited 600 s
        await engine.stop()
        return result, recorder.batches

    assert run(scenario()) == (("k", 1), [("k", [1])])


def test_batches_fill_up_to_the_limit_and_split_by_key():
    async def scenario():
        recorder = Recorder()
        engine = Engine(recorder, max_batch_size=4, max_wait_s=0.001, max_queue_size=32)
        engine.start()
        gate = threading.Event()
        engine.executor.submit(gate.wait)  # the model thread is busy: everything queues
        primer = asyncio.ensure_future(engine.submit("p", 0, 60))
        await asyncio.sleep(0)
        while engine._running == 0:
            await asyncio.sleep(0.001)
        jobs = [asyncio.ensure_future(engine.submit("a" if i % 3 else "b", i, 60)) for i in range(10)]
        while engine.depth < 10:
            await asyncio.sleep(0.001)
        gate.set()
        results = await asyncio.gather(primer, *jobs)
        await engine.stop()
        return results, recorder.batches

    results, batches = run(scenario())
    assert results[1:] == [("a" if i % 3 else "b", i) for i in range(10)]
    sizes = [(key, len(items)) for key, items in batches]
    assert sizes[0] == ("p", 1)
    assert sorted(sizes[1:]) == [("a", 2), ("a", 4), ("b", 4)]  # a: 6 items in 4 + 2, b: 4 items
    assert all(len(items) <= 4 for _, items in batches)


def test_a_failing_item_fails_alone_and_a_full_queue_refuses():
    async def scenario():
        engine = Engine(Recorder(), max_batch_size=4, max_wait_s=0, max_queue_size=1)
        engine.start()
        gate = threading.Event()
        engine.executor.submit(gate.wait)
        first = asyncio.ensure_future(engine.submit("k", "boom", 60))
        while engine._running == 0:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(engine.submit("k", "fine", 60))
        while engine.depth < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull):
            await engine.submit("k", "third", 60)
        gate.set()
        outcome = await asyncio.gather(first, second, return_exceptions=True)
        await engine.stop()
        with pytest.raises(EngineStopped):
            await engine.submit("k", "late", 60)
        return outcome

    failed, fine = run(scenario())
    assert isinstance(failed, ValueError) and fine == ("k", "fine")


def test_stop_answers_every_waiting_request():
    """Queued requests and the batch in flight get EngineStopped (503) instead of waiting forever."""

    async def scenario():
        engine = Engine(Recorder(), max_batch_size=1, max_wait_s=0, max_queue_size=8)
        engine.start()
        gate = threading.Event()
        engine.executor.submit(gate.wait)
        jobs = [asyncio.ensure_future(engine.submit("k", i, 60)) for i in range(3)]
        while engine.depth < 2:
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        return await asyncio.gather(*jobs, return_exceptions=True)

    outcome = run(scenario())
    assert all(isinstance(o, EngineStopped) for o in outcome)


def test_docs_settings_table_is_current():
    from pathlib import Path

    from service.settings import settings_table

    docs = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in docs, (
        "regenerate the settings table in README.md from service.settings.settings_table()"
    )


class Poisoned:
    """A stand-in model whose whole call raises when one payload is poison (as an out-of-range token id
    does inside a real batch); counts its calls."""

    def __init__(self, poison=("boom",), error=IndexError) -> None:
        self.poison, self.error, self.calls = poison, error, []

    def __call__(self, key, payloads):
        self.calls.append(list(payloads))
        if any(p in self.poison for p in payloads):
            raise self.error("index out of range in self")
        return [(key, p) for p in payloads]


class CountingMetrics(EngineMetrics):
    def __init__(self) -> None:
        self.isolations: list[tuple[int, int]] = []

    def isolated(self, extra_calls: int, failed: int) -> None:
        self.isolations.append((extra_calls, failed))


def one_batch(model, payloads, metrics=None):
    """Every payload queued while the model thread is busy, so they all run as one batch."""

    async def scenario():
        engine = Engine(model, max_batch_size=len(payloads), max_wait_s=0, max_queue_size=64, metrics=metrics)
        engine.start()
        gate = threading.Event()
        engine.executor.submit(gate.wait)
        jobs = [asyncio.ensure_future(engine.submit("k", p, 60)) for p in payloads]
        while engine.depth + engine._running < len(payloads):
            await asyncio.sleep(0.001)
        gate.set()
        outcome = await asyncio.gather(*jobs, return_exceptions=True)
        await engine.stop()
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
