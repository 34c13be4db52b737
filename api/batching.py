"""Micro-batching: concurrent requests share one model call, off the event loop.

Requests queue their preprocessed image; one background task takes what is waiting (up to `max_size`,
waiting at most `max_wait_ms` for more once the first has arrived) and runs the model in a dedicated thread.
While the model runs, new requests queue up, so batches grow with load and a lone request waits for nothing
but `max_wait_ms`. Items carry the model they were preprocessed for, so a model swap never mixes inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("catdog.api")

BatchObserver = Callable[[int, float], None]


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


@dataclass
class _Item:
    model: Any
    image: np.ndarray
    future: asyncio.Future[np.ndarray] = field(repr=False)


class MicroBatcher:
    """Groups single-image predictions into model batches; `model.predict(batch)` gives (N, classes)."""

    def __init__(
        self, max_size: int, max_wait_ms: float, max_queue: int, observe: BatchObserver | None = None
    ) -> None:
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._observe = observe
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def predict(self, model: Any, image: np.ndarray) -> np.ndarray:
        """The class probabilities of one preprocessed image, computed in a shared batch."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(model, image, future))
        except asyncio.QueueFull as exc:
            raise QueueFull(f"{self._queue.maxsize} images are already waiting for the model") from exc
        return await future

    async def run_in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function` on the inference thread (warm-ups), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _collect(self) -> list[_Item]:
        items = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(items) < self.max_size:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            live = [item for item in items if not item.future.done()]
            for model in {id(item.model): item.model for item in live}.values():
                group = [item for item in live if item.model is model]
                await self._run_group(model, group)

    async def _run_group(self, model: Any, group: list[_Item]) -> None:
        images = [item.image for item in group]
        started = time.perf_counter()
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self._executor, _predict, model, images
            )
        except Exception as exc:
            log.error("inference failed on a batch of %d: %s", len(group), exc)
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self._observe is not None:
            self._observe(len(group), time.perf_counter() - started)
        for item, row in zip(group, probabilities, strict=True):
            if not item.future.done():
                item.future.set_result(row)


def _predict(model: Any, images: list[np.ndarray]) -> np.ndarray:
    """Stack and run one batch on the inference thread, so the copy never holds up the event loop."""
    return model.predict(np.stack(images))
