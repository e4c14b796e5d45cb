"""A driver-side client of the controller actor (used by the demo, tests and
benchmarks; the gRPC and HTTP frontends run inside the controller process).

Lifecycle: ``ClusterClient(cluster_name)`` looks the controller up by name;
``generate`` submits and yields ``StreamChunk``s until the request finishes.

Tokens reach the client two ways at once, merged by position (each yielded
once, in order):
- the request's Redis output channel (``cluster.token_channel``), subscribed
  before anything else: the controller publishes each token as it accepts
  it, so a token costs no Ray call;
- one ``Controller.stream_chunks(lazy=True)`` streaming call: the tokens the
  controller had before the subscription, the finished chunk (finish reason,
  timing), and every ``LAZY_IDLE_S`` whatever is new, so a message the
  channel lost arrives anyway.
Without the channel (no Redis reachable from here, or no password for it in
this process's environment) every chunk comes through ``stream_chunks``.

If the controller dies mid-stream, the client waits for a replacement (same
name) and resumes from its cursor: the replacement re-runs the request from
the journal, so the caller sees no duplicate and no gap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import redis
from ray.exceptions import RayActorError

from cluster.controller import StreamChunk
from cluster.launcher import NAMESPACE, controller_name
from cluster.token_channel import Subscriber, TokenSlice, decode_tokens, output_channel
from workers.sampling import SamplingParams

log = logging.getLogger("baton.ray_client")

LAZY_IDLE_S = 1.0  # a lost channel message reaches the client after at most about this long
_CHANNEL_LOST = object()  # the output channel failed: follow everything through Ray


class ClusterClient:
    def __init__(self, cluster_name: str, reconnect_timeout_s: float = 60.0,
                 token_channel: bool = True):
        """``token_channel=False``: every chunk through Ray."""
        self.name = controller_name(cluster_name)
        self.reconnect_timeout_s = reconnect_timeout_s
        self._controller = None
        self._channel: dict | None = None if token_channel else {}  # {}: none

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
        """Chunks carrying the tokens after ``cursor`` as they arrive, then the
        finished chunk; resumed from the cursor on a replacement controller."""
        sub = await self._subscribe(request_id)
        merge = _Merge(request_id, cursor)
        inbox: asyncio.Queue = asyncio.Queue()
        feeds = [asyncio.ensure_future(self._follow(merge, inbox, lazy=sub is not None))]
        if sub is not None:
            feeds.append(asyncio.ensure_future(_listen(sub, inbox)))
        try:
            while True:
                item = await inbox.get()
                if item is _CHANNEL_LOST:  # every token through Ray from here on
                    feeds[0].cancel()
                    feeds[0] = asyncio.ensure_future(self._follow(merge, inbox, lazy=False))
                    continue
                if isinstance(item, BaseException):
                    raise item
                chunk = merge.add(item)
                if chunk is not None:
                    yield chunk
                    if chunk.finished:
                        return
        finally:
            for feed in feeds:
                feed.cancel()
            if sub is not None:
                sub.close()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        rid = await self.submit(prompt_token_ids, params, request_id)
        async for chunk in self.stream(rid):
            yield chunk

    async def cancel(self, request_id: str) -> bool:
        return await (await self.controller()).cancel.remote(request_id)

    # ----- the two feeds ----------------------------------------------------------
    async def _follow(self, merge: _Merge, inbox: asyncio.Queue, lazy: bool) -> None:
        """``stream_chunks`` items into ``inbox`` until the finished one (or an
        error), one streaming call per controller."""
        try:
            while True:
                ctl = await self.controller()
                gen = ctl.stream_chunks.options(num_returns="streaming").remote(
                    merge.request_id, merge.cursor, LAZY_IDLE_S if lazy else 5.0, lazy)
                try:
                    async for ref in gen:
                        chunk = await ref
                        inbox.put_nowait(chunk)
                        if chunk.finished:
                            return
                except RayActorError:
                    await self.controller(fresh=True)
                finally:
                    _cancel(gen)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - raised by the stream, not here
            inbox.put_nowait(exc)

    async def _subscribe(self, request_id: str) -> Subscriber | None:
        """A subscription to the request's output channel, confirmed; None if
        the cluster offers none or it cannot be reached from here."""
        info = await self._channel_info()
        if not info:
            return None
        env = info.get("password_env")
        try:
            sub = await Subscriber.open(info["url"], os.environ.get(env) if env else None)
            await sub.subscribe(output_channel(info["namespace"], request_id))
        except (OSError, redis.RedisError, asyncio.TimeoutError) as exc:
            log.warning("no token channel (%s); streaming through Ray", type(exc).__name__)
            self._channel = {}
            return None
        return sub

    async def _channel_info(self) -> dict:
        if self._channel is None:
            ctl = await self.controller()
            self._channel = await ctl.token_channel.remote() or {}
        return self._channel


async def _listen(sub: Subscriber, inbox: asyncio.Queue) -> None:
    try:
        while True:
            for _, payload in await sub.messages():
                inbox.put_nowait(decode_tokens(payload))
    except (OSError, redis.RedisError, ValueError, TypeError) as exc:
        log.warning("token channel lost (%s); streaming through Ray", type(exc).__name__)
        inbox.put_nowait(_CHANNEL_LOST)


@dataclass
class _Part:
    """Consecutive tokens of the request from ``position`` on."""

    position: int
    token_ids: list[int]
    texts: list[str]  # text delta of each token
    times: list[float]  # when each reached the controller


class _Merge:
    """One request's tokens from both feeds: each position once, in order.
    Whatever starts after a gap (a channel message that overtook the
    catch-up chunk, or followed a lost one) waits until the gap is filled."""

    def __init__(self, request_id: str, cursor: int):
        self.request_id, self.cursor = request_id, cursor
        self._pending: list[_Part] = []
        self._timing: dict = {}

    def add(self, item: TokenSlice | StreamChunk) -> StreamChunk | None:
        """The chunk to yield for a channel message or a ``stream_chunks``
        chunk (None if it brings nothing new)."""
        final = None
        if isinstance(item, StreamChunk):
            self._timing = item.timing
            final = item if item.finished else None
            texts = list(item.texts) if len(item.texts) == len(item.token_ids) else _texts(item)
            part = _Part(item.cursor - len(item.token_ids), item.token_ids, texts,
                         item.token_times)
        else:
            part = _Part(item.position, item.token_ids, item.texts,
                         [item.at] * len(item.token_ids))
        self._pending.append(part)
        ids, texts, times = self._take()
        if not ids and final is None:
            return None
        return StreamChunk(self.request_id, ids, "".join(texts), self.cursor, final is not None,
                           final.finish_reason if final else None, self._timing, times, texts)

    def _take(self) -> tuple[list[int], list[str], list[float]]:
        """Tokens after the cursor from every pending part that reaches it."""
        ids, texts, times = [], [], []
        while ready := [p for p in self._pending if p.position <= self.cursor]:
            for p in sorted(ready, key=lambda p: p.position):
                self._pending.remove(p)
                skip = self.cursor - p.position
                if skip < len(p.token_ids):
                    ids += p.token_ids[skip:]
                    texts += p.texts[skip:]
                    times += p.times[skip:]
                    self.cursor = p.position + len(p.token_ids)
        return ids, texts, times


def _texts(chunk: StreamChunk) -> list[str]:
    """Per-token text deltas of a chunk without them: its whole text on its first token."""
    return [chunk.text] + [""] * (len(chunk.token_ids) - 1) if chunk.token_ids else []


def _cancel(gen) -> None:
    """Stop a streaming call we no longer read (its controller-side generator
    would otherwise run on, counted as a follower)."""
    try:
        ray.cancel(gen)
    except Exception:  # noqa: BLE001 - already finished, or its controller is gone
        pass
