"""A worker's outbox for the controller's long-poll: token events of a decode
worker, prefill results of a prefill worker.

Lifecycle: any thread (the engine loop, a KV-finisher thread, the actor's
event loop) ``put``s items; the controller calls the worker's poll method,
which awaits ``since(cursor, timeout_s)``: items before ``cursor`` were
delivered and are dropped, the call waits up to ``timeout_s`` for something
new, and returns every item after ``cursor`` with the cursor that follows
them. One poll call returns everything that piled up since the last one, so
the number of Ray calls grows with polls, not with items. A streaming reader
(a Ray streaming generator) iterates ``follow(cursor)`` instead: one batch per
wake-up, nothing dropped on its behalf; the mailbox then keeps only the last
``keep`` items.

Items are numbered in put order (a cursor is such a number), so a reader that
also gets them another way (a decode worker's Redis event stream) can tell
which it already has. A ``put`` wakes the event loop only while a reader
waits on it: items nobody is waiting for cost no thread hop.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether ``event`` was set within ``timeout_s``. On Python >= 3.11
    without ``wait_for``'s extra task: this runs once per streamed item."""
    if event.is_set():
        return True
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(timeout_s):
                await event.wait()
        else:
            await asyncio.wait_for(event.wait(), timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        return False
    return True


class Mailbox(Generic[T]):
    def __init__(self, keep: int = 1 << 16) -> None:
        self.keep = keep  # items kept at most (a reader further behind loses the oldest)
        self._items: list[T] = []
        self._base = 0  # index of _items[0] in the whole history
        self._lock = threading.Lock()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._sleepers = 0  # readers waiting in _wait (guarded by _lock)

    def put(self, items: list[T]) -> int:
        """Thread-safe; wakes a waiting reader. Returns the number (cursor) of
        the first item put."""
        with self._lock:
            first = self._base + len(self._items)
            self._items.extend(items)
            excess = len(self._items) - self.keep
            if excess > 0:
                del self._items[:excess]
                self._base += excess
            wake = self._sleepers > 0
        if wake:
            self._aio.call_soon_threadsafe(self._wakeup.set)
        return first

    async def since(self, cursor: int, timeout_s: float) -> tuple[list[T], int]:
        """Items after ``cursor`` (waits up to ``timeout_s`` for one) and the
        cursor after them; items before ``cursor`` are dropped."""
        self._bind_loop()
        items, end = self._take(cursor)
        if not items and timeout_s > 0:
            await self._wait(cursor, timeout_s)
            items, end = self._take(cursor)
        return items, end

    async def follow(self, cursor: int, idle_s: float) -> AsyncIterator[tuple[list[T], int]]:
        """Forever: the items after ``cursor`` as they arrive, one batch per
        wake-up, with the cursor after them; an empty batch after ``idle_s``
        without items. Drops nothing."""
        self._bind_loop()
        while True:
            items, cursor = self._peek(cursor)
            if not items:
                await self._wait(cursor, idle_s)
                items, cursor = self._peek(cursor)
            yield items, cursor

    async def _wait(self, cursor: int, timeout_s: float) -> None:
        """Until an item after ``cursor`` exists, or ``timeout_s``. No wake-up
        is lost: the check and the registration share the lock with ``put``,
        and a put's wake-up runs on the loop only after this coroutine
        yields, i.e. after the clear."""
        with self._lock:
            if self._base + len(self._items) > cursor:
                return
            self._wakeup.clear()
            self._sleepers += 1
        try:
            await wait_event(self._wakeup, timeout_s)
        finally:
            with self._lock:
                self._sleepers -= 1

    def end(self) -> int:
        with self._lock:
            return self._base + len(self._items)

    def _take(self, cursor: int) -> tuple[list[T], int]:
        with self._lock:  # the copy and its end in one critical section
            drop = max(0, min(cursor - self._base, len(self._items)))
            del self._items[:drop]
            self._base += drop
            return list(self._items), self._base + len(self._items)

    def _peek(self, cursor: int) -> tuple[list[T], int]:
        with self._lock:
            start = max(0, cursor - self._base)
            return self._items[start:], self._base + len(self._items)

    def _bind_loop(self) -> None:
        if self._aio is None:
            self._aio = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
