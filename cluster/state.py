"""Cluster state in Redis: worker registry and heartbeats, request journal,
prefix-block index, completed-request log. Keys are namespaced per cluster.

Lifecycle: the controller opens a ``StateStore`` at start-up, journals each
request on arrival, appends tokens as they stream, closes the entry on
finish, and on restart re-reads every in-flight entry. While serving, those
writes go through a ``JournalBatcher``: one command per event-loop tick,
a submit acknowledged only once its entry is written. Workers run a
``Heartbeat`` thread that registers them and refreshes a key with a TTL.

Keys (``ns`` = the cluster's namespace)::

    ns:workers               hash  worker id -> JSON description
    ns:hb:<worker>           str   heartbeat, expires after ``ttl_s``
    ns:req:<id>              hash  prompt, params, arrival, state, workers (kept a
                                   while after finishing, for reconnecting clients)
    ns:req:<id>:tokens       list  token ids streamed so far
    ns:req:<id>:text         list  their text deltas
    ns:inflight              set   ids of unfinished requests
    ns:prefix:<hash>         set   workers holding that KV block (expires)
    ns:completed             list  JSON (prompt_tokens, output_tokens, ...) newest first, capped
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import redis
import redis.asyncio as aioredis

from workers.sampling import SamplingParams

log = logging.getLogger("baton.state")


@dataclass(frozen=True)
class JournalEntry:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    token_ids: list[int]  # streamed so far
    texts: list[str]  # text delta of each streamed token
    state: str  # waiting | running | finished
    finish_reason: str | None = None


@functools.lru_cache(maxsize=256)
def params_to_json(p: SamplingParams) -> str:
    """Memoized: most requests share a handful of sampling settings."""
    return json.dumps(asdict(p))


def params_from_json(text: str) -> SamplingParams:
    d = json.loads(text)
    d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
    d["stop"] = tuple(d.get("stop", ()))
    return SamplingParams(**d)


def password_from_env(variable: str | None) -> str | None:
    """The Redis password from the variable ``redis.password_env`` names.

    Read in the process that opens the connection (head or worker pod, both
    given the variable from a Secret), so the password never travels as a Ray
    argument; None when the config names no variable.
    """
    if variable is None:
        return None
    password = os.environ.get(variable)
    if password is None:
        raise ValueError(f"redis.password_env: environment variable {variable!r} is not set")
    return password


# Applies a JSON list of journal ops (StateStore.op_*) in order. ARGV: namespace,
# TTL of finished entries (s), cap of the completed log, the ops.
_APPLY_OPS = """
local ns, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local inflight, completed = ns .. ':inflight', ns .. ':completed'
local closed = false
local function push(key, values)  -- in slices: unpack() has a stack limit
  for i = 1, #values, 1000 do
    redis.call('RPUSH', key, unpack(values, i, math.min(i + 999, #values)))
  end
end
for _, op in ipairs(cjson.decode(ARGV[4])) do
  local kind, key = op[1], ns .. ':req:' .. op[2]
  if kind == 'new' then
    redis.call('HSET', key, 'prompt', cjson.encode(op[3]), 'params', op[4],
               'arrival_s', op[5], 'state', 'waiting')
    redis.call('SADD', inflight, op[2])
  elseif kind == 'route' then
    redis.call('HSET', key, 'state', 'running', 'prefill_worker', op[3],
               'decode_worker', op[4])
  elseif kind == 'tokens' then
    push(key .. ':tokens', op[3])
    push(key .. ':text', op[4])
  elseif kind == 'finish' then
    redis.call('HSET', key, 'state', 'finished', 'finish_reason', op[3])
    redis.call('EXPIRE', key, ttl)
    redis.call('EXPIRE', key .. ':tokens', ttl)
    redis.call('EXPIRE', key .. ':text', ttl)
    redis.call('SREM', inflight, op[2])
    redis.call('LPUSH', completed, op[4])
    closed = true
  end
end
if closed then redis.call('LTRIM', completed, 0, cap - 1) end
return 0
"""


class StateStore:
    def __init__(self, url: str, namespace: str, password: str | None = None,
                 completed_cap: int = 100_000, prefix_ttl_s: int = 600,
                 finished_ttl_s: int = 600):
        self.ns = namespace
        # A blocking pool waits for a free connection instead of raising when
        # many requests journal at once (the default pool raises at its cap).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, password=password, decode_responses=True, max_connections=64, timeout=10)
        self.r = aioredis.Redis(connection_pool=pool)
        self._apply_ops = self.r.register_script(_APPLY_OPS)
        self.completed_cap = completed_cap
        self.prefix_ttl_s = prefix_ttl_s
        self.finished_ttl_s = finished_ttl_s

    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    async def ping(self) -> bool:
        return await self.r.ping()

    async def close(self) -> None:
        await self.r.aclose()

    # ----- journal ----------------------------------------------------------
    # Every journal write is an op (a JSON-ready list, see ``_APPLY_OPS``);
    # ``apply`` writes a list of ops with ONE Redis command, atomically. The
    # one-shot methods below write one op; ``JournalBatcher`` one list per tick.
    @staticmethod
    def op_new(request_id: str, prompt: list[int], params: SamplingParams,
               arrival_s: float) -> list:
        return ["new", request_id, prompt, params_to_json(params), repr(arrival_s)]

    @staticmethod
    def op_route(request_id: str, prefill: str, decode: str) -> list:
        return ["route", request_id, prefill, decode]

    @staticmethod
    def op_tokens(request_id: str, tokens: list[int], texts: list[str]) -> list:
        return ["tokens", request_id, [str(t) for t in tokens], texts]

    @staticmethod
    def op_finish(request_id: str, reason: str, record: dict) -> list:
        return ["finish", request_id, reason, json.dumps({**record, "finish_reason": reason})]

    async def apply(self, ops: list[list], per_command: int = 4096) -> None:
        """Write ops in order: one atomic command (a Lua script) per
        ``per_command`` ops, so that no command holds Redis for long."""
        for i in range(0, len(ops), per_command):
            await self._apply_ops(args=[self.ns, self.finished_ttl_s, self.completed_cap,
                                        json.dumps(ops[i:i + per_command])])

    async def journal_new(self, request_id: str, prompt: list[int], params: SamplingParams,
                          arrival_s: float) -> None:
        await self.apply([self.op_new(request_id, prompt, params, arrival_s)])

    async def journal_tokens(self, batch: list[tuple[str, list[int], list[str]]]) -> None:
        """Append streamed tokens of several requests in one round trip."""
        await self.apply([self.op_tokens(*item) for item in batch])

    async def journal_finish(self, request_id: str, reason: str, record: dict) -> None:
        """Close the entry; it stays readable for ``finished_ttl_s`` so a client
        reconnecting after a controller restart still gets its final chunk."""
        await self.apply([self.op_finish(request_id, reason, record)])

    async def inflight(self) -> list[JournalEntry]:
        entries = [await self.lookup(rid) for rid in sorted(await self.r.smembers(self._k("inflight")))]
        return [e for e in entries if e is not None]

    async def lookup(self, request_id: str) -> JournalEntry | None:
        h = await self.r.hgetall(self._k("req", request_id))
        if not h:
            return None
        tokens = [int(t) for t in await self.r.lrange(self._k("req", request_id, "tokens"), 0, -1)]
        texts = await self.r.lrange(self._k("req", request_id, "text"), 0, -1)
        return JournalEntry(request_id, json.loads(h["prompt"]), params_from_json(h["params"]),
                            float(h["arrival_s"]), tokens, texts, h.get("state", "waiting"),
                            h.get("finish_reason"))

    async def completed(self, limit: int = 1000) -> list[dict]:
        return [json.loads(x) for x in await self.r.lrange(self._k("completed"), 0, limit - 1)]

    # ----- prefix-block index --------------------------------------------------
    async def index_prefix(self, worker_id: str, block_hashes: list[int]) -> None:
        if not block_hashes:
            return
        async with self.r.pipeline(transaction=False) as p:
            for h in block_hashes:
                p.sadd(self._k("prefix", str(h)), worker_id)
                p.expire(self._k("prefix", str(h)), self.prefix_ttl_s)
            await p.execute()

    async def prefix_hits(self, block_hashes: list[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of the prompt it holds."""
        if not block_hashes:
            return {}
        async with self.r.pipeline(transaction=False) as p:
            for h in block_hashes:
                p.smembers(self._k("prefix", str(h)))
            holders = await p.execute()
        hits: dict[str, int] = {}
        alive = set(holders[0])
        for depth, members in enumerate(holders, 1):
            alive &= set(members)
            for w in alive:
                hits[w] = depth
        return hits

    # ----- workers -------------------------------------------------------------
    async def workers(self) -> dict[str, dict]:
        raw = await self.r.hgetall(self._k("workers"))
        beats = {w: await self.r.exists(self._k("hb", w)) for w in raw}
        return {w: {**json.loads(v), "alive": bool(beats[w])} for w, v in raw.items()}


class JournalBatcher:
    """Write-behind journal: every write queued while the event loop runs one
    tick (and while the previous flush is in flight) goes to Redis in ONE
    command, in the order queued.

    Lifecycle of a write::

        queued (``new`` / ``route`` / ``tokens`` / ``finish``)
          -> the flush task wakes after the current tick (route and token
             writes alone wait up to ``lazy_s`` for more: a streamed token
             costs no Redis command of its own), takes every queued write
             and sends them as ONE command (``StateStore.apply``: a Lua
             script, so a flush is atomic and costs one reply to parse)
          -> ``new`` returns a future done once that command executed (the
             controller acknowledges a submit only then: an accepted request
             is always in the journal before its first token can exist);
             the other writes are not awaited (a lost token write costs only
             a replay: sampling is seeded per token position, so a recovered
             request regenerates the same tokens)

    A failed flush fails the futures of its ``new`` writes (the submits are
    refused) and is logged for the others.
    """

    def __init__(self, store: StateStore, lazy_s: float = 0.02):
        self.store = store
        self.lazy_s = lazy_s  # route and token writes wait at most this long for company
        self._lazy: asyncio.TimerHandle | None = None
        self._ops: list[list] = []
        self._waiters: list[asyncio.Future] = []  # of ``new`` ops in _ops
        self._flusher: asyncio.Task | None = None
        self.flushes = 0  # commands sent
        self.writes = 0  # ops they carried

    def new(self, request_id: str, prompt: list[int], params: SamplingParams,
            arrival_s: float) -> asyncio.Future:
        return self._queue(self.store.op_new(request_id, prompt, params, arrival_s),
                           durable=True)

    def route(self, request_id: str, prefill: str, decode: str) -> None:
        self._queue(self.store.op_route(request_id, prefill, decode), lazy=True)

    def tokens(self, batch: list[tuple[str, list[int], list[str]]]) -> None:
        for item in batch:
            self._queue(self.store.op_tokens(*item), lazy=True)

    def finish(self, request_id: str, reason: str, record: dict) -> None:
        self._queue(self.store.op_finish(request_id, reason, record))

    async def flushed(self) -> None:
        """Wait until everything queued so far reached Redis (or failed)."""
        await asyncio.shield(self._queue(None, durable=True))

    def _queue(self, op: list | None, durable: bool = False,
               lazy: bool = False) -> asyncio.Future | None:
        loop = asyncio.get_running_loop()
        if op is not None:
            self._ops.append(op)
        fut = loop.create_future() if durable else None
        if fut is not None:
            self._waiters.append(fut)
        if lazy and self.lazy_s > 0:
            if self._lazy is None and self._flusher is None:
                self._lazy = loop.call_later(self.lazy_s, self._start_flush)
        else:
            self._start_flush()
        return fut

    def _start_flush(self) -> None:
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_all())

    async def _flush_all(self) -> None:
        try:
            await asyncio.sleep(0)  # let the rest of this tick queue its writes
            while self._ops or self._waiters:
                ops, self._ops = self._ops, []
                waiters, self._waiters = self._waiters, []
                await self._flush(ops, waiters)
        finally:
            self._flusher = None

    async def _flush(self, ops: list[list], waiters: list[asyncio.Future]) -> None:
        error: Exception | None = None
        try:
            await self.store.apply(ops)
        except Exception as exc:  # noqa: BLE001 - reported to every waiting writer
            error = exc
            log.warning("journal flush of %d writes failed: %s", len(ops), type(exc).__name__)
        self.flushes += 1
        self.writes += len(ops)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error) if error else fut.set_result(None)


class Heartbeat:
    """Registers a worker and refreshes its heartbeat key from a thread."""

    def __init__(self, url: str, namespace: str, worker_id: str, info: dict,
                 password: str | None = None, period_s: float = 1.0, ttl_s: int = 5):
        self.r = redis.from_url(url, password=password, decode_responses=True)
        self.key = f"{namespace}:hb:{worker_id}"
        self.period_s, self.ttl_s = period_s, ttl_s
        self.r.hset(f"{namespace}:workers", worker_id, json.dumps(info))
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="heartbeat").start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.r.set(self.key, repr(time.time()), ex=self.ttl_s)
            except redis.RedisError:
                pass  # Redis briefly away: the key expires and we look dead meanwhile
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        self.r.delete(self.key)
