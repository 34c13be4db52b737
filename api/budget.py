"""The service's memory: how much the process is given, the share decodes may hold at once, and a
glibc setting so that memory freed after a big decode goes back to the system.

Decodes are rationed by their estimated peak bytes (catdog.preprocessing.plan_decode), not by count: one
40-megapixel PNG needs as much as a hundred phone JPEGs (which JPEG draft decoding shrinks while
decoding).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger("catdog.api")
MiB = 1024 * 1024
FALLBACK_LIMIT_MB = 1024  # the Kubernetes pod's limit (deploy/k8s), used where no cgroup limit is found
CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 * MiB


class OverBudget(Exception):
    """One decode would need more than the whole decode budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"decoding it needs about {needed // MiB} MiB, over the budget of {budget // MiB} MiB"
        )
        self.needed = needed
        self.budget = budget


def cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's container, if it runs under one."""
    for path in CGROUP_LIMIT_FILES:
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip()
            # "max" (v2) or a huge number (v1, 2^63 rounded to pages) means no limit.
            if text != "max" and int(text) < 1 << 50:
                return int(text)
    return None


def memory_limit_bytes(setting_mb: int) -> int:
    """MEMORY_LIMIT_MB when set, else the container's limit, else the pod limit of the manifests."""
    if setting_mb > 0:
        return setting_mb * MiB
    return cgroup_limit_bytes() or FALLBACK_LIMIT_MB * MiB


def return_freed_memory_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 1 MiB, so every image buffer is its own mapping, unmapped on free.

    By default glibc raises the threshold to the size of the largest block freed (up to 32 MiB), after
    which Pillow's 16 MiB image blocks come from the heap and stay resident: three worst-case decodes left
    the service at 1.7 GB for good. Returns whether the setting took (glibc only).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


class DecodeBudget:
    """A pool of bytes that concurrent decodes reserve their estimated peak from, first come first served.

    Hand-written because asyncio's and anyio's semaphores count holders, not amounts: what must be bounded
    is the memory the decodes hold together. Waiters are served in order (a big decode is not starved by
    a stream of small ones); a decode larger than the whole pool is refused at once.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        """Hold `amount` bytes of the pool for the duration of the block."""
        if amount > self.total:
            raise OverBudget(amount, self.total)
        if self._waiters or self.used + amount > self.total:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (amount, future)
            self._waiters.append(entry)
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self._release(amount)  # granted just as the waiter was cancelled
                else:
                    # A release may already have dropped this cancelled entry from the queue.
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)
                    self._wake()
                raise
        else:
            self.used += amount
        try:
            yield
        finally:
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            amount, future = self._waiters.popleft()
            if future.done():
                continue
            self.used += amount
            future.set_result(None)
