"""The micro-batcher: batches grow with load, order is kept, errors reach every caller, models never mix;
supervision: a model that raises, answers the wrong shape or hangs fails only the requests it touches, the
batcher is not ready until a model call works again (a request's or the canary's), a hung thread is
abandoned for a fresh one, a dead loop is restarted, and it is not alive when it cannot recover."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from api.batching import (
    InferenceFailed,
    InferenceTimeout,
    InferenceUnavailable,
    MicroBatcher,
    QueueFull,
)

BOUND = 20.0  # seconds any wait in these tests may take before it fails (nothing should come near it)


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
    assert all(isinstance(error, InferenceFailed) for error in failed)
    assert all(isinstance(error.__cause__, RuntimeError) for error in failed)
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


class Faulty:
    """A model with switchable faults: `broken` makes it raise, `short` answer one row short, `hang` block
    (until `release`) on images whose first value is 0.9. Otherwise P = (x, 1 - x)."""

    def __init__(self) -> None:
        self.broken = threading.Event()
        self.short = threading.Event()
        self.hang = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        first = batch.reshape(len(batch), -1)[:, 0]
        if self.hang.is_set() and np.isclose(first, 0.9).any():
            self.release.wait(BOUND)
        if self.broken.is_set():
            raise RuntimeError("onnxruntime says no")
        rows = np.stack([first, 1 - first], axis=1)
        return rows[:-1] if self.short.is_set() else rows


async def until(condition, what: str) -> None:
    """Wait (bounded) for a condition the batcher reaches by itself, e.g. through its canary."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.01)


async def answer(batcher: MicroBatcher, model, value: float):
    """The batcher's answer or its exception; bounded, so a batcher that hangs fails the test."""
    try:
        return await asyncio.wait_for(batcher.predict(model, image(value)), BOUND)
    except TimeoutError:
        raise AssertionError("the request hung") from None
    except Exception as exc:
        return exc


def scenario(coroutine_function, **options):
    """Run `coroutine_function(batcher, model)` with a started batcher (canary: the model on 0.5)."""

    async def main():
        batcher = MicroBatcher(max_size=4, max_wait_ms=1, max_queue=16, **options)
        model = Faulty()
        batcher.set_canary(model, image(0.5))
        batcher.start()
        try:
            return await coroutine_function(batcher, model)
        finally:
            model.release.set()
            await batcher.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("fault", ["broken", "short"])
def test_a_failing_model_fails_its_requests_and_ready_returns_once_it_works(fault: str) -> None:
    async def run(batcher: MicroBatcher, model: Faulty):
        assert batcher.ready and batcher.alive
        getattr(model, fault).set()
        failed = await asyncio.gather(*(answer(batcher, model, 0.1) for _ in range(3)))
        calls = model.calls
        await until(lambda: model.calls > calls, "the canary ran")
        still_broken = (batcher.ready, batcher.problem, batcher.alive)
        getattr(model, fault).clear()
        await until(lambda: batcher.ready, "ready again through the canary")
        after = await answer(batcher, model, 0.25)
        return failed, still_broken, after, batcher.state()

    failed, still_broken, after, state = scenario(run, probe_s=0.05)
    assert all(isinstance(error, InferenceFailed) for error in failed), failed
    assert still_broken == (False, "inference failed", True)
    np.testing.assert_allclose(after, [0.25, 0.75])
    assert state["failed_batches"] >= 1 and state["recoveries"] == 1 and state["ready"]
    assert ("RuntimeError" if fault == "broken" else "answered") in state["last_error"]


def test_a_request_that_succeeds_makes_it_ready_again_before_the_canary() -> None:
    async def run(batcher: MicroBatcher, model: Faulty):
        model.short.set()
        failed = await answer(batcher, model, 0.1)
        broken = batcher.ready
        model.short.clear()
        served = await answer(batcher, model, 0.2)
        return failed, broken, served, batcher.ready

    failed, broken, served, ready = scenario(run, probe_s=BOUND)
    assert isinstance(failed, InferenceFailed) and broken is False
    np.testing.assert_allclose(served, [0.2, 0.8])
    assert ready is True


def test_a_hung_call_is_abandoned_for_a_fresh_thread() -> None:
    async def run(batcher: MicroBatcher, model: Faulty):
        model.hang.set()
        hung = await answer(batcher, model, 0.9)
        stuck = (batcher.ready, batcher.problem, batcher.alive, batcher.abandoned_running)
        served = await answer(batcher, model, 0.3)
        recovered = (batcher.ready, batcher.alive)
        second = await answer(batcher, model, 0.9)
        too_many = (batcher.alive, batcher.unrecoverable)
        model.release.set()
        await until(lambda: batcher.abandoned_running == 0, "the hung threads to finish")
        return hung, stuck, served, recovered, second, too_many, batcher.alive

    hung, stuck, served, recovered, second, too_many, alive = scenario(
        run, deadline_s=0.3, max_abandoned=1, probe_s=BOUND
    )
    assert isinstance(hung, InferenceTimeout) and isinstance(second, InferenceTimeout)
    assert stuck == (False, "inference timed out", True, 1)
    np.testing.assert_allclose(served, [0.3, 0.7])
    assert recovered == (True, True)
    assert too_many == (False, "too many hung inference threads")
    assert alive is True


def test_requests_waiting_behind_a_hung_call_time_out_and_the_next_ones_run() -> None:
    async def run(batcher: MicroBatcher, model: Faulty):
        model.hang.set()
        first = asyncio.ensure_future(answer(batcher, model, 0.9))
        await until(lambda: model.calls == 1, "the hung call to start")
        waiting = await asyncio.gather(*(answer(batcher, model, 0.4) for _ in range(2)))
        return await first, waiting, await answer(batcher, model, 0.6)

    first, waiting, after = scenario(run, deadline_s=0.3, max_abandoned=1, probe_s=BOUND)
    assert isinstance(first, InferenceTimeout)
    assert all(isinstance(w, InferenceTimeout) or np.allclose(w, [0.4, 0.6]) for w in waiting)
    np.testing.assert_allclose(after, [0.6, 0.4])


def test_warm_ups_share_the_deadline() -> None:
    async def run(batcher: MicroBatcher, model: Faulty):
        model.hang.set()
        try:
            await batcher.run_in_thread(model.predict, image(0.9)[None])
        except InferenceTimeout as exc:
            return exc, batcher.abandoned_running, await answer(batcher, model, 0.5)
        raise AssertionError("the hung warm-up returned")

    error, abandoned, after = scenario(run, deadline_s=0.2, max_abandoned=1, probe_s=BOUND)
    assert isinstance(error, InferenceTimeout) and abandoned == 1
    np.testing.assert_allclose(after, [0.5, 0.5])


def test_a_dead_loop_fails_its_requests_and_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    crashes = iter([True])
    run_group = MicroBatcher._run_group

    async def crashing(self, model, group):  # a bug in the loop itself, after it took the batch
        if next(crashes, False):
            raise KeyError("a bug in the loop")
        await run_group(self, model, group)

    monkeypatch.setattr(MicroBatcher, "_run_group", crashing)

    async def run(batcher: MicroBatcher, model: Faulty):
        lost = await answer(batcher, model, 0.1)
        broken = (batcher.ready, batcher.problem)
        served = await answer(batcher, model, 0.7)
        return lost, broken, served, batcher.state()

    lost, broken, served, state = scenario(run, probe_s=BOUND)
    assert isinstance(lost, InferenceFailed) and isinstance(lost.__cause__, KeyError)
    assert broken == (False, "inference loop crashed")
    np.testing.assert_allclose(served, [0.7, 0.3])
    assert state["loop_restarts"] == 1 and state["ready"]


def test_a_loop_that_keeps_dying_gives_up_and_is_not_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    async def crashing(self, model, group):
        raise KeyError("a bug in the loop")

    monkeypatch.setattr(MicroBatcher, "_run_group", crashing)

    async def run(batcher: MicroBatcher, model: Faulty):
        answers = [await answer(batcher, model, 0.1) for _ in range(3)]
        await until(lambda: not batcher.running, "the supervisor to give up")
        refused = await answer(batcher, model, 0.1)
        return answers, refused, batcher.alive, batcher.unrecoverable

    answers, refused, alive, why = scenario(run, max_restarts=2, probe_s=BOUND)
    assert all(isinstance(a, InferenceFailed | InferenceUnavailable) for a in answers), answers
    assert isinstance(refused, InferenceUnavailable)
    assert alive is False and why == "inference loop cannot be restarted"


def test_a_canary_that_keeps_failing_makes_it_not_alive() -> None:
    async def run(batcher: MicroBatcher, model: Faulty):
        model.broken.set()
        await answer(batcher, model, 0.1)
        await until(lambda: not batcher.alive, "the canary to give up")
        return batcher.unrecoverable, batcher.state()["probe_failures"]

    why, probes = scenario(run, probe_s=0.01, max_probe_failures=3)
    assert why == "inference keeps failing" and probes == 3


def test_a_failing_observer_never_fails_the_requests() -> None:
    def observe(size: int, seconds: float) -> None:
        raise ValueError("metrics broke")

    async def run(batcher: MicroBatcher, model: Faulty):
        return await answer(batcher, model, 0.4), batcher.ready

    served, ready = scenario(run, observe=observe)
    np.testing.assert_allclose(served, [0.4, 0.6])
    assert ready is True


def test_stop_answers_every_request_it_holds() -> None:
    """Queued requests, a batch in flight and a call waiting for the inference thread all get
    InferenceUnavailable on stop, long before the backstop (3 x a 60 s deadline)."""
    release = threading.Event()

    started = threading.Event()

    class Blocking(Model):
        def predict(self, batch: np.ndarray) -> np.ndarray:
            started.set()
            release.wait(BOUND)
            return super().predict(batch)

    batcher = MicroBatcher(max_size=1, max_wait_ms=0, max_queue=10, deadline_s=60)

    async def scenario() -> list:
        batcher.start()
        model = Blocking()
        requests = [asyncio.create_task(batcher.predict(model, image(0.5))) for _ in range(3)]
        # The first batch is running (blocked) on the inference thread, the others wait in the queue.
        await asyncio.to_thread(started.wait, BOUND)
        warm_up = asyncio.create_task(batcher.run_in_thread(lambda: 1))
        await asyncio.sleep(0.05)
        try:
            await batcher.stop()
            return await asyncio.wait_for(asyncio.gather(*requests, warm_up, return_exceptions=True), BOUND)
        finally:
            release.set()

    answers = asyncio.run(scenario())
    assert len(answers) == 4
    assert all(isinstance(answer, InferenceUnavailable) for answer in answers), answers
