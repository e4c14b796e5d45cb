"""Following decode workers' token events for the controller.

A decode (or mixed) worker numbers its events in a mailbox and publishes each
engine step on its Redis event channel (``cluster/token_channel.py``). The
controller owns one ``TokenFollower``; the follower hands it each worker's
events in mailbox order, each once, as ``TokenStep`` values.

Lifecycle of a followed worker::

    follow      subscribe to its event channel (if it has one), then skip the
                events of dispatches before now: in this order, every later
                event is received; a task follows its ``stream_outputs``
    redis       while subscribed and its channel keeps up: steps come from the
                subscriber connection (one for all workers), the Ray stream
                brings only heartbeats (``HEARTBEAT_S``)
    ray         its channel fell behind (a heartbeat names events that have not
                arrived), or it has none: steps come as Ray stream items for
                ``RAY_FALLBACK_S``, then back to ``redis`` if it publishes again
    unfollow    the controller saw it die or retired it: unsubscribed, its
                task ends at its next item

Either way a step is numbered: a step starting past the cursor means a lost
message, and every event since the cursor is fetched from the worker
(``next_outputs``); events before the cursor are dropped. A lost subscriber
connection is reopened and every worker resubscribed (what was published
meanwhile shows as a gap). A worker that raises ``RayActorError`` is reported
through ``on_died``; the controller answers with ``unfollow``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import ray
import redis
from ray.exceptions import RayActorError

from cluster.token_channel import Subscriber, decode_batch
from workers.messages import TokenEvent, WorkerLoad

log = logging.getLogger("baton.token_follower")

HEARTBEAT_S = 0.25  # a decode worker followed through Redis sends a Ray heartbeat this often
RAY_FALLBACK_S = 5.0  # a worker whose Redis channel fell behind is followed through Ray this long


@dataclass(frozen=True)
class TokenStep:
    """Events of one worker, after those of its previous step, in its order."""

    worker_id: str
    events: list[TokenEvent]  # not delivered before (may be empty: a load update)
    load: WorkerLoad | None  # the worker's load; None: unchanged since its previous step
    load_at: float  # wall-clock time the step's load was taken (it counts every
    #                 request admitted before then); 0.0: not known


OnStep = Callable[[TokenStep], Awaitable[None]]  # delivers a step; must not raise
OnDied = Callable[[str], Awaitable[None]]  # a worker's call raised RayActorError


@dataclass
class _Followed:
    worker_id: str
    handle: object  # Ray actor handle
    channel: str | None  # its Redis event channel; None: followed through Ray only
    cursor: int = 0  # mailbox number of the next event to deliver
    subscribed: bool = False  # Redis confirmed our subscription to ``channel``
    heard_end: int = 0  # the event count its previous heartbeat reported
    ray_until: float = 0.0  # (monotonic) follow it through Ray until then
    active: bool = True  # False once unfollowed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time


class TokenFollower:
    """Delivers decode workers' token events in order, each once, through
    Redis while it keeps up and through Ray otherwise (see the module doc)."""

    def __init__(self, redis_url: str, redis_password: str | None, on_step: OnStep,
                 on_died: OnDied):
        self._url, self._password = redis_url, redis_password  # the password is never logged
        self._on_step, self._on_died = on_step, on_died
        self._followed: dict[str, _Followed] = {}  # by worker id
        self._by_channel: dict[bytes, _Followed] = {}  # subscribed channels
        self._sub: Subscriber | None = None  # one connection for every event channel
        self._sub_lock = asyncio.Lock()  # (re)connecting and subscribing
        self._tasks: set[asyncio.Task] = set()

    # ----- what the controller asks -------------------------------------------------
    def start(self) -> None:
        """Start reading the event channels (once, in the controller's event loop)."""
        self._spawn(self._read_events())

    async def follow(self, worker_id: str, handle) -> WorkerLoad:
        """Subscribe, skip the events before now, start following; returns
        the worker's load. A worker call that fails is raised."""
        f = _Followed(worker_id, handle, await _event_channel(handle))
        self._followed[worker_id] = f
        try:
            if f.channel is not None:
                await self._subscribe(f)
            _, f.cursor, load = await handle.next_outputs.remote(1 << 62, 0.0)
        except BaseException:
            self.unfollow(worker_id)
            raise
        self._spawn(self._follow_stream(f))
        return load

    def unfollow(self, worker_id: str) -> None:
        """Stop following (idempotent): no step of it is delivered after the
        one in progress."""
        f = self._followed.pop(worker_id, None)
        if f is None:
            return
        f.active = f.subscribed = False
        if f.channel is not None and self._by_channel.pop(f.channel.encode(), None) is not None:
            self._spawn(self._unsubscribe(f.channel))

    def via_redis(self, worker_id: str) -> bool:
        """Whether the worker's events come through its Redis channel now."""
        f = self._followed.get(worker_id)
        return f is not None and _redis_ok(f)

    # ----- the Ray stream: events or heartbeats ---------------------------------------
    async def _follow_stream(self, f: _Followed) -> None:
        """Follow the worker's ``stream_outputs`` until it is unfollowed,
        reopening it whenever it switches between events and heartbeats."""
        while f.active:
            via_redis = _redis_ok(f)
            gen = _open_stream(f, via_redis)
            try:
                await self._read_stream(f, gen, via_redis)
            except RayActorError:
                await self._on_died(f.worker_id)
                return
            except Exception:  # noqa: BLE001 - re-follow; a dead worker fails the ping
                log.exception("following %s failed", f.worker_id)
                await asyncio.sleep(0.1)
                if not await self._answers(f):
                    return
            finally:
                cancel_stream(gen)

    async def _read_stream(self, f: _Followed, gen, via_redis: bool) -> None:
        """Items until the stream must be reopened the other way (or ``f`` is
        unfollowed)."""
        async for ref in gen:
            if via_redis:
                _, end, _, _ = await ref
                if not (f.subscribed and self._heartbeat(f, end)):
                    return  # the channel fell behind: follow the worker through Ray
            else:
                events, end, load, load_at = await ref
                await self._on_batch(f, end - len(events), events, load, load_at)
                if _redis_ok(f) and await self._publishing(f):
                    return  # the channel is usable again: heartbeats only
            if not f.active:
                return

    def _heartbeat(self, f: _Followed, end: int) -> bool:
        """False if events the worker had published by its previous heartbeat
        (``HEARTBEAT_S`` ago) have still not arrived through Redis: the worker
        is then followed through Ray (from our cursor: nothing is lost) for
        ``RAY_FALLBACK_S``."""
        lagging = f.cursor < f.heard_end
        f.heard_end = end
        if lagging:
            log.warning("%s's event channel fell behind; following it through Ray for %.0f s",
                        f.worker_id, RAY_FALLBACK_S)
            f.ray_until = time.monotonic() + RAY_FALLBACK_S
        return not lagging

    async def _publishing(self, f: _Followed) -> bool:
        """Whether the worker's publisher works (if not, ask again after
        ``RAY_FALLBACK_S``)."""
        if await _event_channel(f.handle) == f.channel:
            return True
        f.ray_until = time.monotonic() + RAY_FALLBACK_S
        return False

    async def _answers(self, f: _Followed) -> bool:
        """Whether to follow ``f`` again after an unexpected failure."""
        if not f.active:
            return False
        try:
            await f.handle.ping.remote()
        except RayActorError:
            await self._on_died(f.worker_id)
            return False
        return True

    # ----- Redis: one subscriber connection for every worker ---------------------------
    async def _subscribe(self, f: _Followed) -> None:
        """Returns once Redis confirmed the subscription (or it failed: the
        worker is then followed through Ray until ``_read_events`` retries)."""
        try:
            async with self._sub_lock:
                if self._sub is None:
                    self._sub = await Subscriber.open(self._url, self._password)
                await self._sub.subscribe(f.channel)
        except (OSError, redis.RedisError, asyncio.TimeoutError) as exc:
            log.warning("subscribing to %s's events failed (%s)", f.worker_id,
                        type(exc).__name__)
            if self._sub is not None:
                self._sub.close()  # _read_events sees it fail and starts over
            return
        self._by_channel[f.channel.encode()] = f
        f.subscribed = True

    async def _read_events(self) -> None:
        """Deliver the messages of every followed worker's event channel, in
        order; after a lost connection, resubscribe (what was published
        meanwhile shows as a gap, fetched from the worker)."""
        while True:
            sub = self._sub
            if sub is None:
                await asyncio.sleep(1.0)
                for f in [f for f in self._followed.values() if f.channel]:
                    await self._subscribe(f)
                continue
            try:
                messages = await sub.messages()
            except (OSError, redis.RedisError) as exc:
                log.warning("the decode workers' event channels failed (%s); resubscribing",
                            type(exc).__name__)
                self._sub = None
                for f in self._followed.values():
                    f.subscribed = False
                continue
            for channel, payload in messages:
                f = self._by_channel.get(channel)
                if f is not None and f.active:
                    await self._on_message(f, payload)

    async def _on_message(self, f: _Followed, payload: bytes) -> None:
        try:
            b = decode_batch(payload)
        except (ValueError, TypeError) as exc:
            log.warning("skipping a malformed message of %s's event channel: %s", f.worker_id,
                        exc)
            return
        try:
            await self._on_batch(f, b.start, b.events, b.load, b.load_at)
        except RayActorError:
            await self._on_died(f.worker_id)

    async def _unsubscribe(self, channel: str) -> None:
        sub = self._sub
        if sub is not None:
            try:
                await sub.unsubscribe(channel)
            except (OSError, redis.RedisError):
                pass  # the connection is gone anyway; _read_events starts over

    # ----- delivery -------------------------------------------------------------------
    async def _on_batch(self, f: _Followed, start: int, events: list[TokenEvent],
                        load: WorkerLoad | None, load_at: float) -> None:
        """Deliver a worker's events numbered ``start``, ``start + 1``, ...: in
        order, each once (Redis and Ray may both bring some), fetching any the
        Redis channel lost from the worker's mailbox."""
        async with f.lock:
            if start > f.cursor:  # some never arrived: every event since our cursor
                events, end, load = await f.handle.next_outputs.remote(f.cursor, 0.0)
                start = end - len(events)
            fresh = events[f.cursor - start:] if start < f.cursor else events
            f.cursor = max(f.cursor, start + len(events))
            await self._on_step(TokenStep(f.worker_id, fresh, load, load_at))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _redis_ok(f: _Followed) -> bool:
    return f.subscribed and time.monotonic() >= f.ray_until


def _open_stream(f: _Followed, via_redis: bool):
    method = f.handle.stream_outputs.options(num_returns="streaming")
    if not via_redis:
        return method.remote(f.cursor)
    f.heard_end = 0  # nothing heard yet: the first heartbeat sets the bar
    return method.remote(f.cursor, HEARTBEAT_S, False)


async def _event_channel(handle) -> str | None:
    """The worker's Redis event channel; None if it has none (no Redis, its
    publisher is down, or a worker that predates event channels)."""
    try:
        return await handle.event_channel.remote()
    except AttributeError:
        return None


def cancel_stream(gen) -> None:
    """Stop a worker's streaming generator we no longer read."""
    if not isinstance(gen, ray.ObjectRefGenerator):
        return  # a stand-in worker's (tests)
    try:
        ray.cancel(gen)
    except Exception:  # noqa: BLE001 - already finished, or its worker is gone
        pass
