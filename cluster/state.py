"""Cluster state in Redis: worker registry and heartbeats, request journal,
prefix-block index, completed-request log. Keys are namespaced per cluster.

Lifecycle: the controller opens a ``StateStore`` at start-up, journals each
request on arrival, appends tokens as they stream, closes the entry on
finish, and on restart re-reads every in-flight entry. Workers run a
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

import json
import os
import threading
import time
from dataclasses import asdict, dataclass

import redis
import redis.asyncio as aioredis

from workers.sampling import SamplingParams


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


def params_to_json(p: SamplingParams) -> str:
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
    async def journal_new(self, request_id: str, prompt: list[int], params: SamplingParams,
                          arrival_s: float) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._k("req", request_id), mapping={
                "prompt": json.dumps(prompt), "params": params_to_json(params),
                "arrival_s": repr(arrival_s), "state": "waiting"})
            p.sadd(self._k("inflight"), request_id)
            await p.execute()

    async def journal_route(self, request_id: str, prefill: str, decode: str) -> None:
        await self.r.hset(self._k("req", request_id), mapping={
            "state": "running", "prefill_worker": prefill, "decode_worker": decode})

    async def journal_tokens(self, batch: list[tuple[str, list[int], list[str]]]) -> None:
        """Append streamed tokens of several requests in one round trip."""
        async with self.r.pipeline(transaction=False) as p:
            for rid, tokens, texts in batch:
                p.rpush(self._k("req", rid, "tokens"), *tokens)
                p.rpush(self._k("req", rid, "text"), *texts)
            await p.execute()

    async def journal_finish(self, request_id: str, reason: str, record: dict) -> None:
        """Close the entry; it stays readable for ``finished_ttl_s`` so a client
        reconnecting after a controller restart still gets its final chunk."""
        keys = [self._k("req", request_id), self._k("req", request_id, "tokens"),
                self._k("req", request_id, "text")]
        async with self.r.pipeline(transaction=True) as p:
            p.hset(keys[0], mapping={"state": "finished", "finish_reason": reason})
            for k in keys:
                p.expire(k, self.finished_ttl_s)
            p.srem(self._k("inflight"), request_id)
            p.lpush(self._k("completed"), json.dumps({**record, "finish_reason": reason}))
            p.ltrim(self._k("completed"), 0, self.completed_cap - 1)
            await p.execute()

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
