"""The micro-batcher: batches grow with load, order is kept, errors reach every caller, models never mix."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from api.batching import MicroBatcher, QueueFull


class Model:
    """Stands in for a model: P = (x, 1 - x) of each image's first value; records its batches and thread."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay, self.fail = delay, fail

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(batch))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        first = batch.reshape(len(batch), -1)[:, 0]
        return np.stack([first, 1 - first], axis=1)


def image(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, dtype=np.float32)


async def _run(batcher: MicroBatcher, calls) -> list:
    batcher.start()
    try:
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_share_batches_and_keep_their_answers() -> None:
    model = Model(delay=0.02)
    observed: list[int] = []
    batcher = MicroBatcher(max_size=8, max_wait_ms=5, max_queue=100, observe=lambda n, s: observed.append(n))
    values = [i / 40 for i in range(40)]
    answers = asyncio.run(_run(batcher, [batcher.predict(model, image(v)) for v in values]))
    for value, answer in zip(values, answers, strict=True):
        np.testing.assert_allclose(answer, [value, 1 - value], rtol=1e-6)
    assert sum(model.batches) == 40 and max(model.batches) == 8
    assert len(model.batches) <= 6
    assert observed == model.batches
    assert model.threads == {next(iter(model.threads))} and "inference" in next(iter(model.threads))


def test_a_lone_request_waits_at_most_max_wait() -> None:
    model = Model()
    batcher = MicroBatcher(max_size=32, max_wait_ms=50, max_queue=10)

    async def timed() -> float:
        started = time.perf_counter()
        await batcher.predict(model, image(0.5))
        return time.perf_counter() - started

    (seconds,) = asyncio.run(_run(batcher, [timed()]))
    assert model.batches == [1]
    assert 0.04 <= seconds < 1.0


def test_model_errors_reach_every_caller_and_the_batcher_goes_on() -> None:
    broken, good = Model(fail=True), Model()
    batcher = MicroBatcher(max_size=4, max_wait_ms=1, max_queue=10)

    async def scenario() -> list:
        failed = await asyncio.gather(
            *(batcher.predict(broken, image(0.1)) for _ in range(3)), return_exceptions=True
        )
        after = await batcher.predict(good, image(0.25))
        return [failed, after]

    ((failed, after),) = asyncio.run(_run(batcher, [scenario()]))
    assert all(isinstance(error, RuntimeError) for error in failed)
    np.testing.assert_allclose(after, [0.25, 0.75])


def test_inputs_for_different_models_are_never_mixed() -> None:
    old, new = Model(delay=0.01), Model(delay=0.01)
    batcher = MicroBatcher(max_size=16, max_wait_ms=10, max_queue=100)
    calls = [batcher.predict(old if i % 2 else new, image(i / 10)) for i in range(10)]
    answers = asyncio.run(_run(batcher, calls))
    assert sum(old.batches) == 5 and sum(new.batches) == 5
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer[0], i / 10, rtol=1e-6)


def test_a_full_queue_refuses_instead_of_growing() -> None:
    model = Model(delay=0.05)
    batcher = MicroBatcher(max_size=1, max_wait_ms=0, max_queue=3)
    answers = asyncio.run(_run(batcher, [batcher.predict(model, image(0.5)) for _ in range(10)]))
    refused = [a for a in answers if isinstance(a, QueueFull)]
    assert refused and len(refused) < 10
    assert all(isinstance(a, np.ndarray | QueueFull) for a in answers)


def test_cancelled_callers_do_not_break_the_batch() -> None:
    model = Model(delay=0.05)
    batcher = MicroBatcher(max_size=4, max_wait_ms=5, max_queue=10)

    async def scenario() -> np.ndarray:
        doomed = asyncio.ensure_future(batcher.predict(model, image(0.3)))
        await asyncio.sleep(0)
        doomed.cancel()
        return await batcher.predict(model, image(0.6))

    (answer,) = asyncio.run(_run(batcher, [scenario()]))
    np.testing.assert_allclose(answer, [0.6, 0.4], rtol=1e-6)


@pytest.mark.parametrize("max_wait_ms", [0, 2])
def test_sequential_requests_run_one_by_one(max_wait_ms: float) -> None:
    model = Model()
    batcher = MicroBatcher(max_size=8, max_wait_ms=max_wait_ms, max_queue=10)

    async def sequential() -> None:
        for i in range(5):
            await batcher.predict(model, image(i / 5))

    asyncio.run(_run(batcher, [sequential()]))
    assert model.batches == [1] * 5
