"""Micro-batching: concurrent requests share one model call, off the event loop, under supervision.

Requests queue their preprocessed image; one background task takes what is waiting (up to `max_size`,
waiting at most `max_wait_ms` for more once the first has arrived) and runs the model on the inference
thread. While the model runs, new requests queue up, so batches grow with load and a lone request waits for
nothing but `max_wait_ms`. Items carry the model they were preprocessed for, so a model swap never mixes
inputs.

Supervision: a failure stays with the requests it touches. A model call that raises or answers a wrong
number of rows fails its batch (InferenceFailed); a request that waited longer than `deadline_s` in the
queue gets InferenceTimeout, and a model call running longer than `deadline_s` fails its batch the same way.
Such a call cannot be interrupted (onnxruntime has no cancel), so its thread is abandoned and a fresh one
takes the calls that were waiting for it. After a failure the batcher is not `ready` until a model call
succeeds again: a later batch, or the canary (`set_canary`) it runs every `probe_s` seconds. The loop itself
is restarted when it dies. The batcher is not `alive` (the process should be restarted) when the loop cannot
be restarted, when more than `max_abandoned` abandoned calls are still running, or when the canary has
failed `max_probe_failures` times in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("catdog.api")

BatchObserver = Callable[[int, float], None]
_Call = tuple[Future, Callable[..., Any], tuple[Any, ...]]


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


class InferenceFailed(Exception):
    """The model call of this request's batch failed (the cause is chained); the next one may succeed."""


class InferenceTimeout(Exception):
    """No answer within the deadline: the request waited too long, or the model call hung."""


class InferenceUnavailable(Exception):
    """The inference loop is not running (stopped, or it died and could not be restarted)."""


@dataclass
class _Item:
    model: Any
    image: np.ndarray
    future: asyncio.Future[np.ndarray] = field(repr=False)
    queued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Canary:
    model: Any
    image: np.ndarray


class _Worker:
    """One daemon thread running calls in order. A hung call is abandoned with its thread: a
    ThreadPoolExecutor would do, but its threads are joined at exit, so one hung call would block it."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, function, args))
        return future

    def retire(self) -> list[_Call]:
        """Stop after the call running now; the calls still waiting are returned, not run."""
        waiting = []
        with contextlib.suppress(queue.Empty):
            while (call := self._calls.get_nowait()) is not None:
                waiting.append(call)
        self._calls.put(None)
        return waiting

    def adopt(self, calls: list[_Call]) -> None:
        for call in calls:
            self._calls.put(call)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)


class MicroBatcher:
    """Groups single-image predictions into model batches; `model.predict(batch)` gives (N, classes)."""

    def __init__(
        self,
        max_size: int,
        max_wait_ms: float,
        max_queue: int,
        observe: BatchObserver | None = None,
        deadline_s: float = 30.0,
        max_abandoned: int = 2,
        probe_s: float = 1.0,
        max_probe_failures: int = 30,
        max_restarts: int = 5,
    ) -> None:
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000
        self.deadline = deadline_s
        self.max_abandoned = max_abandoned
        self.probe_s = probe_s
        self.max_probe_failures = max_probe_failures
        self.max_restarts = max_restarts
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._observe = observe
        self._names = itertools.count()
        self._worker: _Worker | None = None
        self._abandoned: list[_Worker] = []
        self._task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._in_hand: list[_Item] = []
        self._canary: _Canary | None = None
        # Why the batcher is not ready (short, public) and the cause (for admins and logs); None = serving.
        self._problem: str | None = None
        self._cause: str | None = None
        self._gave_up: str | None = None
        self._crashes = 0
        self._probe_failures = 0
        self.counts = {"failed_batches": 0, "timeouts": 0, "loop_restarts": 0, "recoveries": 0}

    def _new_worker(self) -> _Worker:
        return _Worker(f"inference-{next(self._names)}")

    def _current_worker(self) -> _Worker:
        """The inference thread, started on first use (not when the app is built)."""
        if self._worker is None:
            self._worker = self._new_worker()
        return self._worker

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        """The inference loop is up (started, not stopped, not given up)."""
        return self._task is not None and not self._task.done()

    @property
    def abandoned_running(self) -> int:
        """Abandoned model calls that are still running (their threads end when the call returns)."""
        self._abandoned = [worker for worker in self._abandoned if worker.running]
        return len(self._abandoned)

    @property
    def ready(self) -> bool:
        """Requests can be served: the loop runs and no model call failed since the last one that worked."""
        return self.running and self._problem is None

    @property
    def alive(self) -> bool:
        """False when only a restart of the process can help."""
        return self.unrecoverable is None

    @property
    def unrecoverable(self) -> str | None:
        """Why only a restart of the process can help (short); None while the batcher can recover."""
        if self._gave_up is not None:
            return self._gave_up
        if self._task is not None and self._task.done():
            return "inference loop stopped"
        if self.abandoned_running > self.max_abandoned:
            return "too many hung inference threads"
        if self._probe_failures >= self.max_probe_failures:
            return "inference keeps failing"
        return None

    @property
    def problem(self) -> str | None:
        """Why the batcher is not ready, in a few words (public); None when it is."""
        if not self.running:
            return self.unrecoverable or "inference loop not started"
        return self._problem

    def state(self) -> dict[str, Any]:
        """Everything about the batcher's health, for admins (GET /admin/status)."""
        return {
            "ready": self.ready,
            "alive": self.alive,
            "problem": self.problem,
            "unrecoverable": self.unrecoverable,
            "last_error": self._cause,
            "waiting": self.waiting,
            "abandoned_threads": self.abandoned_running,
            "probe_failures": self._probe_failures,
            "deadline_s": self.deadline,
            **self.counts,
        }

    def set_canary(self, model: Any, image: np.ndarray) -> None:
        """The known-good input the batcher runs to find out whether inference works again after a failure."""
        self._canary = _Canary(model, image)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the loop and answer every request it still holds (queued, in a batch, or a call waiting for
        the inference thread) with InferenceUnavailable, so none waits for the backstop."""
        for task in (self._recovery, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._recovery = None
        self._task = None
        error = InferenceUnavailable("the inference loop stopped")
        lost, self._in_hand = self._in_hand, []
        _fail(lost, error)
        self._drain(error)
        if self._worker is not None:
            for future, _function, _args in self._worker.retire():
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)
            self._worker = None

    async def predict(self, model: Any, image: np.ndarray) -> np.ndarray:
        """The class probabilities of one preprocessed image, computed in a shared batch."""
        if not self.running:
            raise InferenceUnavailable(self.problem or "inference loop not running")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(model, image, future))
        except asyncio.QueueFull as exc:
            raise QueueFull(f"{self._queue.maxsize} images are already waiting for the model") from exc
        try:
            # The loop answers every request: past the deadline in the queue, or when its model call runs
            # past the deadline. This is only a backstop, should the loop itself ever stall.
            return await asyncio.wait_for(future, 3 * self.deadline)
        except TimeoutError:
            raise InferenceTimeout(f"no prediction within {3 * self.deadline:g} s") from None

    async def run_in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function` on the inference thread (warm-ups), in turn with the batches; same deadline."""
        return await self._call(function, *args)

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        worker = self._current_worker()
        future = worker.submit(function, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.deadline)
        except TimeoutError:
            self._abandon(worker)
            self.counts["timeouts"] += 1
            raise InferenceTimeout(f"the model call ran past the {self.deadline:g} s deadline") from None

    def _abandon(self, worker: _Worker) -> None:
        """Leave a hung call's thread behind; a fresh thread takes the calls that were waiting for it."""
        if worker is not self._worker:
            return
        self._worker = self._new_worker()
        self._worker.adopt(worker.retire())
        self._abandoned.append(worker)
        log.error(
            "a model call hung past %g s: its thread is abandoned (%d still running, at most %d allowed)",
            self.deadline,
            self.abandoned_running,
            self.max_abandoned,
        )

    async def _supervise(self) -> None:
        """Run the loop; when it dies, fail the requests it held and start it again (with a short pause)."""
        while True:
            try:
                await self._serve()
            except Exception as exc:
                self._crashes += 1
                self.counts["loop_restarts"] += 1
                log.exception("the inference loop died (%d in a row)", self._crashes)
                lost, self._in_hand = self._in_hand, []
                _fail(lost, InferenceFailed("inference failed"), exc)
                self._failed("inference loop crashed", exc)
                if self._crashes > self.max_restarts:
                    self._gave_up = "inference loop cannot be restarted"
                    log.critical("the inference loop died %d times in a row: giving up", self._crashes)
                    self._drain(InferenceUnavailable(self._gave_up))
                    return
                await asyncio.sleep(min(0.05 * 2 ** (self._crashes - 1), 2.0))

    def _drain(self, error: Exception) -> None:
        while not self._queue.empty():
            _fail([self._queue.get_nowait()], error)

    async def _serve(self) -> None:
        while True:
            await self._collect()
            now = time.monotonic()
            expired = [item for item in self._in_hand if now - item.queued > self.deadline]
            _fail(expired, InferenceTimeout(f"waited more than {self.deadline:g} s for the model"))
            live = [item for item in self._in_hand if not item.future.done()]
            for model in {id(item.model): item.model for item in live}.values():
                await self._run_group(model, [item for item in live if item.model is model])
            self._in_hand = []

    async def _collect(self) -> None:
        """Take the next batch into `_in_hand` (so a crash of the loop can still answer its requests)."""
        self._in_hand = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(self._in_hand) < self.max_size:
            if not self._queue.empty():
                self._in_hand.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                self._in_hand.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

    async def _run_group(self, model: Any, group: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            rows = await self._call(_predict, model, [item.image for item in group])
            _check_rows(rows, len(group))
        except InferenceTimeout as exc:
            self._failed("inference timed out", exc)
            _fail(group, exc)
            return
        except Exception as exc:
            log.error("inference failed on a batch of %d: %s", len(group), _describe(exc))
            self.counts["failed_batches"] += 1
            self._failed("inference failed", exc)
            _fail(group, InferenceFailed("inference failed"), exc)
            return
        self._succeeded()
        if self._observe is not None:
            try:
                self._observe(len(group), time.perf_counter() - started)
            except Exception:
                log.exception("the batch observer failed")
        for item, row in zip(group, rows, strict=True):
            if not item.future.done():
                item.future.set_result(row)

    def _failed(self, problem: str, exc: BaseException) -> None:
        """Not ready until a model call works again; the canary finds out when no request does."""
        self._problem, self._cause = problem, f"{problem}: {_describe(exc)}"
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(), name="inference-probe")

    def _succeeded(self) -> None:
        if self._problem is not None:
            log.info("inference works again after: %s", self._cause)
            self.counts["recoveries"] += 1
        self._problem = None
        self._crashes = 0
        self._probe_failures = 0

    async def _recover(self) -> None:
        """While not ready: every `probe_s`, one canary call; a success (its or a request's) ends it."""
        while self._problem is not None:
            await asyncio.sleep(self.probe_s)
            canary = self._canary
            if self._problem is None or canary is None:
                continue
            try:
                _check_rows(await self._call(_predict, canary.model, [canary.image]), 1)
            except Exception as exc:
                self._probe_failures += 1
                self._cause = f"{self._problem}: the canary failed too: {_describe(exc)}"
                log.warning("inference canary failed (%d in a row): %s", self._probe_failures, _describe(exc))
                continue
            self._succeeded()


def _predict(model: Any, images: list[np.ndarray]) -> np.ndarray:
    """Stack and run one batch on the inference thread, so the copy never holds up the event loop."""
    return model.predict(np.stack(images))


def _check_rows(rows: Any, expected: int) -> None:
    """A model answer must have one row per image: anything else would give requests other images' rows."""
    count = getattr(rows, "shape", (None,))[0] if getattr(rows, "ndim", 0) >= 1 else None
    if count != expected:
        shape = getattr(rows, "shape", type(rows).__name__)
        raise InferenceFailed(f"the model answered {shape} for {expected} images")


def _fail(items: list[_Item], error: Exception, cause: BaseException | None = None) -> None:
    if cause is not None:
        error.__cause__ = cause
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
