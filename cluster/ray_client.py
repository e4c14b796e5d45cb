"""A driver-side client of the controller actor (used by the demo, tests and
the frontends running beside the controller).

Lifecycle: ``ClusterClient(cluster_name)`` looks the controller up by name;
``generate`` submits and yields ``StreamChunk``s until the request finishes.
If the controller dies mid-stream, it waits for a replacement (same name)
and resumes from its cursor: the replacement re-runs the request from the
journal, so the caller sees no duplicate and no gap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import ray
from ray.exceptions import RayActorError

from cluster.controller import StreamChunk
from cluster.launcher import NAMESPACE, controller_name
from workers.sampling import SamplingParams


class ClusterClient:
    def __init__(self, cluster_name: str, reconnect_timeout_s: float = 60.0):
        self.name = controller_name(cluster_name)
        self.reconnect_timeout_s = reconnect_timeout_s
        self._controller = None

    async def controller(self, fresh: bool = False):
        if self._controller is None or fresh:
            deadline = time.monotonic() + self.reconnect_timeout_s
            while True:
                try:
                    self._controller = ray.get_actor(self.name, namespace=NAMESPACE)
                    await self._controller.status.remote()
                    return self._controller
                except (ValueError, RayActorError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        return self._controller

    async def submit(self, prompt_token_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> str:
        ctl = await self.controller()
        return await ctl.submit.remote(request_id, prompt_token_ids, params)

    async def stream(self, request_id: str, cursor: int = 0) -> AsyncIterator[StreamChunk]:
        """One streaming call (``Controller.stream_chunks``) per controller: a
        chunk per Ray object as tokens arrive; resumed from the cursor on a
        replacement controller."""
        while True:
            ctl = await self.controller()
            chunks = ctl.stream_chunks.options(num_returns="streaming").remote(request_id, cursor)
            try:
                async for ref in chunks:
                    chunk = await ref
                    cursor = chunk.cursor
                    if chunk.token_ids or chunk.finished:
                        yield chunk
                    if chunk.finished:
                        return
            except RayActorError:
                await self.controller(fresh=True)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        rid = await self.submit(prompt_token_ids, params, request_id)
        async for chunk in self.stream(rid):
            yield chunk

    async def cancel(self, request_id: str) -> bool:
        return await (await self.controller()).cancel.remote(request_id)
