"""The frontends' backend interface over one in-process engine (no Ray, no
Redis): what the streaming-overhead benchmark measures the frontends on.

Lifecycle: ``EngineBackend(engine)`` starts an ``EngineLoop`` thread; bind it
to the serving event loop with ``attach()`` (from inside that loop), then the
gRPC and HTTP frontends call ``submit`` / ``stream`` / ``cancel`` exactly as
they call the controller. Every token's publication time on the engine
thread is kept (``token_times``) so a client's inter-token latency can be
compared with the engine's own. ``close()`` stops the thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from cluster.controller import StreamChunk, UnknownRequest
from workers.engine import LLMEngine, RequestOutput
from workers.engine_loop import EngineLoop
from workers.sampling import SamplingParams


@dataclass
class _Tracked:
    prompt_tokens: int
    arrival_s: float
    tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # engine-thread publication times
    finish_reason: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class EngineBackend:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._requests: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._aio: asyncio.AbstractEventLoop | None = None
        self.loop = EngineLoop(engine, self._on_outputs)

    def attach(self) -> None:
        self._aio = asyncio.get_running_loop()

    async def submit(self, request_id: str | None, prompt_token_ids: list[int],
                     params: SamplingParams) -> str:
        rid = request_id or f"local-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        self._requests[rid] = _Tracked(len(prompt_token_ids), time.time())
        try:
            await self.loop.call(lambda e: e.add_request(rid, prompt_token_ids, params))
        except ValueError:
            del self._requests[rid]
            raise
        return rid

    async def stream(self, request_id: str, cursor: int = 0, timeout_s: float = 5.0
                     ) -> StreamChunk:
        r = self._requests.get(request_id)
        if r is None:
            raise UnknownRequest(request_id)
        if len(r.tokens) <= cursor and r.finish_reason is None:
            r.changed.clear()
            try:
                await asyncio.wait_for(r.changed.wait(), timeout_s)
            except TimeoutError:
                pass
        end = len(r.tokens)
        timing = {"ttft_s": r.times[0] - r.arrival_s} if r.times else {}
        return StreamChunk(request_id, r.tokens[cursor:end], "".join(r.texts[cursor:end]), end,
                           r.finish_reason is not None, r.finish_reason, timing,
                           r.times[cursor:end])

    async def cancel(self, request_id: str) -> bool:
        r = self._requests.get(request_id)
        if r is None or r.finish_reason is not None:
            return False
        await self.loop.call(lambda e: e.abort(request_id))
        r.finish_reason = "abort"
        r.changed.set()
        return True

    async def drain_frontends(self) -> None:
        return None

    async def metrics_text(self) -> bytes:
        return b""

    async def status(self) -> dict:
        running = sum(1 for r in self._requests.values() if r.finish_reason is None)
        return {"name": "engine", "waiting": 0, "running": running, "workers": []}

    def token_times(self, request_id: str) -> list[float]:
        return list(self._requests[request_id].times)

    def close(self) -> None:
        self.loop.stop()

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        if self._aio is not None:
            self._aio.call_soon_threadsafe(self._apply, outputs, now)

    def _apply(self, outputs: list[RequestOutput], now: float) -> None:
        for o in outputs:
            r = self._requests.get(o.request_id)
            if r is None or r.finish_reason == "abort":
                continue
            r.tokens += o.new_token_ids
            r.texts += [o.new_text] + [""] * (len(o.new_token_ids) - 1)
            r.times += [now] * len(o.new_token_ids)
            if o.finished:
                r.finish_reason = o.finish_reason.value if o.finish_reason else "stop"
            r.changed.set()
