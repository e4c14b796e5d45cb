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
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self, keep: int = 1 << 16) -> None:
        self.keep = keep  # items kept at most (a reader further behind loses the oldest)
        self._items: list[T] = []
        self._base = 0  # index of _items[0] in the whole history
        self._lock = threading.Lock()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def put(self, items: list[T]) -> None:
        """Thread-safe; wakes a waiting poll."""
        with self._lock:
            self._items.extend(items)
            excess = len(self._items) - self.keep
            if excess > 0:
                del self._items[:excess]
                self._base += excess
        if self._aio is not None:
            self._aio.call_soon_threadsafe(self._wakeup.set)

    async def since(self, cursor: int, timeout_s: float) -> tuple[list[T], int]:
        """Items after ``cursor`` (waits up to ``timeout_s`` for one) and the
        cursor after them; items before ``cursor`` are dropped."""
        self._bind_loop()
        items, end = self._take(cursor)
        if not items and timeout_s > 0:
            await self._wait(timeout_s)
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
                await self._wait(idle_s)
                items, cursor = self._peek(cursor)
            yield items, cursor

    async def _wait(self, timeout_s: float) -> None:
        """Until the next ``put`` or ``timeout_s``. No wake-up is lost: a put
        from another thread sets the event through the loop, which runs it only
        after this coroutine yields, i.e. after the clear."""
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        except TimeoutError:
            pass

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
