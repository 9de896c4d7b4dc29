"""The batching engine on its own, with a plain function as the model: batch sizes, per-item errors,
shutdown. (The HTTP-level behaviour is in test_batching.py.)"""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import Engine, EngineStopped, QueueFull


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
