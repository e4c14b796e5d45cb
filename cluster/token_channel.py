"""Streamed tokens through Redis Pub/Sub instead of a Ray call per token.

Why: on a small CPU box a Ray streaming-generator item costs ~0.5-1 ms of CPU
on each side (several thread wake-ups: event loop, executor thread, the core
worker's I/O threads), and on a decode worker that CPU and its GIL compete
with the engine thread itself. A published message costs its writer one
socket write (the reply is read later, never waited for) and its reader one
event-loop wake-up, with no command to send per message (the server pushes).
The cluster's Redis is already authenticated (URL and password from the
config's ``redis`` block; the password from the environment of the process
that connects, never a Ray argument).

Channels (``ns`` = the cluster's namespace)::

    ns:events:<worker id>:<incarnation>   a decode worker's output: one message
        per engine step that produced tokens or changed its load
    ns:out:<request id>                   one request's tokens as the controller
        accepts them, while a driver-side client follows it (cluster/ray_client.py)

Pub/Sub keeps nothing: a message sent while a reader is disconnected is
lost. Every message is therefore numbered by its sender (a decode worker's
events by their mailbox number, a request's tokens by their position), and
each reader keeps a cursor: it skips what it already has and, on a gap, gets
the missing part from the authoritative Ray path (the worker's mailbox, the
controller's request). Lifecycle of a decode worker's step: the engine thread
numbers its events in the mailbox (``workers.mailbox``), ``Publisher.publish``
sends ``encode_batch(first number, events, load)``; the controller's
``TokenFollower`` (cluster/token_follower.py) reads them with a ``Subscriber``
and delivers ``decode_batch`` results in order, filling gaps.

Encoding: compact JSON, never pickle (a reader must not run what the network
sends). A batch is ``[first, [[request id, [token ids], text, finish reason |
null], ...], load fields | null, load time]``; a request's message is
``[position of its first token, [token ids], [text deltas], time]``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from dataclasses import asdict, dataclass, fields

import hiredis
import redis
from redis.connection import parse_url

from workers.gpu import GPUStats
from workers.messages import TokenEvent, WorkerLoad

log = logging.getLogger("baton.token_channel")

_MAX_UNREAD = 256  # replies a publisher lets pile up before it waits for them


def events_channel(namespace: str, worker_id: str, incarnation: str) -> str:
    return f"{namespace}:events:{worker_id}:{incarnation}"


def output_channel(namespace: str, request_id: str) -> str:
    return f"{namespace}:out:{request_id}"


# ----- encoding ---------------------------------------------------------------------
@dataclass(frozen=True)
class EventBatch:
    """One engine step of a decode worker, as the controller reads it."""

    start: int  # mailbox number of events[0]
    events: list[TokenEvent]
    load: WorkerLoad | None  # None: unchanged since the worker's previous batch
    load_at: float  # wall-clock time the worker's current load was taken


@dataclass(frozen=True)
class TokenSlice:
    """Tokens of one request from ``position`` on, as the controller accepted them."""

    position: int
    token_ids: list[int]
    texts: list[str]  # text delta of each token
    at: float  # wall-clock time they reached the controller


_LOAD_FIELDS = tuple(f.name for f in fields(WorkerLoad))


def encode_batch(start: int, events: list[TokenEvent], load: WorkerLoad | None,
                 load_at: float) -> str:
    ev = [[e.request_id, e.token_ids, e.text, e.finish_reason] for e in events]
    ld = None
    if load is not None:
        ld = [getattr(load, f) for f in _LOAD_FIELDS]
        ld[-1] = None if load.gpu is None else asdict(load.gpu)
    return json.dumps([start, ev, ld, load_at], separators=(",", ":"))


def decode_batch(raw: bytes | str) -> EventBatch:
    start, ev, ld, load_at = json.loads(raw)
    load = None
    if ld is not None:
        gpu = ld[-1]
        load = WorkerLoad(*ld[:-1], gpu=None if gpu is None else GPUStats(**gpu))
    return EventBatch(int(start), [TokenEvent(str(rid), [int(t) for t in ids], str(text),
                                              None if reason is None else str(reason))
                                   for rid, ids, text, reason in ev], load, float(load_at))


def encode_tokens(position: int, token_ids: list[int], texts: list[str], at: float) -> str:
    return json.dumps([position, token_ids, texts, at], separators=(",", ":"))


def decode_tokens(raw: bytes | str) -> TokenSlice:
    position, token_ids, texts, at = json.loads(raw)
    return TokenSlice(int(position), [int(t) for t in token_ids], [str(t) for t in texts],
                      float(at))


# ----- publishing from a thread (synchronous) -----------------------------------------
class Publisher:
    """PUBLISHes from one thread without waiting for replies.

    ``publish`` writes the command and reads whatever replies already
    arrived; only past ``_MAX_UNREAD`` unread replies does it wait for them
    (Redis not keeping up). A failed write or an error reply drops the
    connection (``publish`` returns False: the caller's fallback takes over);
    the next publish after ``retry_s`` reconnects.
    """

    def __init__(self, url: str, password: str | None, channel: str, retry_s: float = 1.0,
                 timeout_s: float = 2.0):
        self.channel, self.retry_s = channel, retry_s
        self._pool = redis.ConnectionPool.from_url(
            url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._conn = None
        self._unread = 0
        self._retry_at = 0.0
        self._connect()

    @property
    def healthy(self) -> bool:
        return self._conn is not None

    def publish(self, payload: str) -> bool:
        conn = self._conn or self._connect()
        if conn is None:
            return False
        try:
            conn.send_packed_command(conn.pack_command("PUBLISH", self.channel, payload),
                                     check_health=False)
            self._unread += 1
            while self._unread and (self._unread > _MAX_UNREAD or conn.can_read(timeout=0)):
                conn.read_response()  # an error reply raises ResponseError
                self._unread -= 1
        except (redis.RedisError, OSError) as exc:
            self._drop(exc)
            return False
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None
        self._pool.disconnect()

    def _connect(self):
        if time.monotonic() < self._retry_at:
            return None
        try:
            conn = self._pool.get_connection()
            conn.connect()
        except (redis.RedisError, OSError) as exc:
            self._drop(exc)
            return None
        self._conn, self._unread = conn, 0
        return conn

    def _drop(self, exc: Exception) -> None:
        log.warning("publishing to %s failed (%s); retrying in %.1f s", self.channel,
                    type(exc).__name__, self.retry_s)
        if self._conn is not None:
            self._conn.disconnect()
        self._conn = None
        self._retry_at = time.monotonic() + self.retry_s


# ----- asyncio: commands, fire-and-forget publishes, subscriptions ---------------------
def _pack(*args) -> bytes:
    """A command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


_DISCARD = None  # a pending reply nobody waits for (a fire-and-forget publish)


class _RespProtocol(asyncio.Protocol):
    """Replies parsed by hiredis as they arrive: pushed messages (subscribe
    mode) go to ``messages``, every other reply to the oldest pending command."""

    def __init__(self) -> None:
        self._parser = hiredis.Reader()
        self._pending: collections.deque[asyncio.Future | None] = collections.deque()
        self.messages: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._message_waiter: asyncio.Future | None = None
        self.lost: BaseException | None = None

    def expect(self, waiter: asyncio.Future | None) -> None:
        self._pending.append(waiter)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while (reply := self._parser.gets()) is not False:
            if isinstance(reply, list) and reply and reply[0] == b"message":
                self.messages.append((reply[1], reply[2]))
            else:
                self._settle(reply)
        if self.messages:
            self._wake()

    def _settle(self, reply) -> None:
        waiter = self._pending.popleft() if self._pending else _DISCARD
        error = isinstance(reply, hiredis.ReplyError)
        if waiter is _DISCARD:
            if error:
                log.warning("Redis refused a publish: %s", reply)
        elif waiter.done():
            pass  # its caller gave up (timeout, cancellation)
        elif error:
            waiter.set_exception(redis.ResponseError(str(reply)))
        else:
            waiter.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        error = redis.ConnectionError(f"Redis connection lost: {self.lost}")
        while self._pending:
            waiter = self._pending.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._message_waiter is not None and not self._message_waiter.done():
            self._message_waiter.set_result(None)

    async def wait_messages(self) -> None:
        while not self.messages:
            if self.lost is not None:
                raise redis.ConnectionError(f"Redis connection lost: {self.lost}")
            self._message_waiter = asyncio.get_running_loop().create_future()
            await self._message_waiter


class RespConnection:
    """One asyncio connection to Redis speaking RESP2: cheaper per reply than
    the redis-py client (no pool, no per-read timeout)."""

    def __init__(self, transport: asyncio.Transport, protocol: _RespProtocol):
        self._transport, self._protocol = transport, protocol

    @classmethod
    async def open(cls, url: str, password: str | None, timeout_s: float = 5.0
                   ) -> RespConnection:
        """``url``: redis://, rediss:// (TLS) or unix://; a password in the
        URL wins over ``password`` (as in redis-py)."""
        opts = parse_url(url)
        loop = asyncio.get_running_loop()
        if "path" in opts:
            connecting = loop.create_unix_connection(_RespProtocol, opts["path"])
        else:
            connecting = loop.create_connection(_RespProtocol, opts.get("host", "localhost"),
                                                opts.get("port", 6379), ssl=_tls(url, opts))
        transport, protocol = await asyncio.wait_for(connecting, timeout_s)
        conn = cls(transport, protocol)
        try:
            secret = opts.get("password") or password
            if secret:
                user = [opts["username"]] if opts.get("username") else []
                await asyncio.wait_for(conn.command("AUTH", *user, secret), timeout_s)
            if opts.get("db"):
                await asyncio.wait_for(conn.command("SELECT", opts["db"]), timeout_s)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def healthy(self) -> bool:
        return self._protocol.lost is None

    async def command(self, *args):
        waiter = asyncio.get_running_loop().create_future()
        self._send(args, waiter)
        return await waiter

    def publish_nowait(self, channel: str, payload: str) -> None:
        """PUBLISH without waiting: an error reply is logged when it arrives."""
        self._send(("PUBLISH", channel, payload), _DISCARD)

    async def messages(self) -> list[tuple[bytes, bytes]]:
        """(channel, payload) of every message pushed since the last call
        (subscribe mode); waits for at least one."""
        await self._protocol.wait_messages()
        out = list(self._protocol.messages)
        self._protocol.messages.clear()
        return out

    def _send(self, args: tuple, waiter: asyncio.Future | None) -> None:
        if self._protocol.lost is not None:
            raise redis.ConnectionError(f"Redis connection lost: {self._protocol.lost}")
        self._protocol.expect(waiter)
        self._transport.write(_pack(*args))

    def close(self) -> None:
        self._transport.close()


def _tls(url: str, opts: dict) -> ssl.SSLContext | None:
    """rediss://: verified TLS, unless the URL says ``ssl_cert_reqs=none``;
    ``ssl_ca_certs`` names a CA bundle (as in redis-py)."""
    if not url.startswith("rediss://"):
        return None
    ctx = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    if str(opts.get("ssl_cert_reqs", "required")).lower() in ("none", "0"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Subscriber:
    """Messages of the channels it subscribed to, in arrival order, on a
    connection of its own (opened by ``open``; any error closes it and is
    raised: the caller resubscribes and fills the gap another way)."""

    def __init__(self, conn: RespConnection):
        self._conn = conn

    @classmethod
    async def open(cls, url: str, password: str | None) -> Subscriber:
        return cls(await RespConnection.open(url, password))

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed: later messages will be received."""
        await self._command("SUBSCRIBE", channel)

    async def unsubscribe(self, channel: str) -> None:
        await self._command("UNSUBSCRIBE", channel)

    async def messages(self) -> list[tuple[bytes, bytes]]:
        """(channel, payload) of every message received since the last
        call; waits for at least one."""
        try:
            return await self._conn.messages()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._conn.close()

    async def _command(self, *args) -> None:
        try:
            await self._conn.command(*args)
        except BaseException:
            self.close()
            raise
