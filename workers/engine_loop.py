"""A thread that owns an ``LLMEngine``: every engine call runs on it.

Lifecycle: a worker actor builds one ``EngineLoop`` at start-up. Actor
methods (asyncio) hand commands to it with ``call`` and await the result; the
thread runs queued commands between engine steps and steps while there is
work, publishing each step's outputs to ``on_outputs``. No engine state is
ever touched from two threads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from workers.engine import LLMEngine, RequestOutput


class EngineLoop:
    def __init__(self, engine: LLMEngine,
                 on_outputs: Callable[[list[RequestOutput]], None],
                 on_idle: Callable[[], None] | None = None):
        self.engine = engine
        self._on_outputs = on_outputs
        self._on_idle = on_idle or (lambda: None)
        self._inbox: queue.Queue = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine-loop")
        self._thread.start()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread and return its result."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def stop(self) -> None:
        self._stop = True
        self._inbox.put(None)

    def _run(self) -> None:
        idle = True
        while not self._stop:
            self._drain(block=idle or not self.engine.has_unfinished())
            idle = True
            if self.engine.has_unfinished():
                steps = self.engine.stats.steps
                outputs = self.engine.step()
                idle = self.engine.stats.steps == steps  # nothing could be scheduled
                if outputs:
                    self._on_outputs(outputs)
            self._on_idle()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as exc:  # noqa: BLE001 - handed back to the caller
                    fut.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
