"""The controller: a Ray async actor holding the request table.

Lifecycle of a request (see DESIGN.md, "A request's life")::

    submit      validate, admission policy, journal in Redis, queue
    schedule    each round the scheduler policy orders the queue; the router
                policy picks (prefill, decode) workers for the front requests
                while workers have room
    dispatch    decode reserves KV blocks -> prefill computes and streams KV
                layer by layer -> first token delivered -> decode admits
                (or recomputes if the transfer failed) -> tokens arrive through
                the decode worker's event channel (or Ray stream)
    finish      journal closed, completed log appended, blocks freed by workers

Batching: the work of a scheduling round goes out as ONE call per worker
(``reserve_batch`` per decode worker, then ``submit_prefills`` per prefill
worker; ``submit_batch`` per mixed worker); prefill results come back through
each prefill worker's ``stream_results`` generator and are followed by one
``admit_batch`` per decode worker (reservations of requests that ended at
their first token are freed with the next ``reserve_batch``, or a
``release_batch`` within ``RELEASE_DELAY_S``). Token events come from each
decode worker's Redis event channel (cluster/token_channel.py: one message
per engine step, no Ray call), or through Ray when the channel falls behind;
a ``TokenFollower`` (cluster/token_follower.py) follows every decode worker
that way and hands the controller each worker's events in order, each once
(``_on_token_step``). A driver
client following a request with ``stream_chunks(..., lazy=True)`` gets its
tokens through the request's Redis output channel (published as they are
delivered, one write, no reply awaited) and, through Ray, only a catch-up
chunk, the finished chunk, and a chunk every ``idle_s`` as a safety net.
Journal writes go
through a ``JournalBatcher`` (one Redis command per event-loop tick); a
submit is acknowledged only once its entry is written. ``submit_many`` takes
many requests in one call.

Failure handling: a worker call that raises ``RayActorError`` marks the worker
dead; each of its unfinished requests is re-queued with the tokens already
streamed and re-prefilled elsewhere (the client's stream continues, no
duplicate, no gap: sampling is seeded per token position). A restarted
controller re-reads the in-flight journal from Redis, aborts those requests on
every worker, and re-queues them.

Policies are pure objects from ``cluster.policies``; this module is the
mechanism around them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from ray.exceptions import RayActorError

from cluster.config import ClusterConfig
from cluster.metrics import ClusterSnapshot, ServingMetrics
from cluster.policies import (
    BoundedQueue,
    RequestView,
    Route,
    SchedulingRound,
    WorkerView,
    make_router,
    scheduler_from_spec,
)
from cluster.policies.scaling import PoolLoad, ScalingDecision, measure_pool
from cluster.policies.scheduler import UNRANKED, Placement
from cluster.state import JournalBatcher, StateStore, password_from_env
from cluster.token_channel import RespConnection, encode_tokens, output_channel
from cluster.token_follower import TokenFollower, TokenStep, cancel_stream
from workers.block_manager import block_hashes
from workers.mailbox import wait_event
from workers.messages import (
    AdmitItem,
    PrefillJob,
    PrefillResult,
    ReserveItem,
    TokenEvent,
    WorkerLoad,
)
from workers.sampling import SamplingParams


class Overloaded(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class UnknownRequest(KeyError):
    """No such request (never submitted, or finished and forgotten)."""


class Unavailable(RuntimeError):
    """The state store cannot be reached; the client should retry."""


class WorkerDied(RuntimeError):
    pass


@dataclass(frozen=True)
class SubmitItem:
    """One request of ``submit_many``."""

    request_id: str | None  # None: the controller names it
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class SubmitOutcome:
    """What ``submit_many`` answers for one item."""

    request_id: str | None
    error: str = ""  # "" accepted | "ValueError" | "Overloaded" | "Unavailable"
    message: str = ""  # why it was refused


log = logging.getLogger("baton.controller")

RELEASE_DELAY_S = 0.02  # a reservation to free waits at most this long for the next round


@dataclass(frozen=True)
class StreamChunk:
    """What ``stream`` returns: tokens after the caller's cursor."""

    request_id: str
    token_ids: list[int]
    text: str
    cursor: int  # pass back to get what follows
    finished: bool
    finish_reason: str | None
    timing: dict  # queue_s, prefill_s, kv_transfer_s, ttft_s, total_s (when known)
    token_times: list[float]  # wall-clock time each token reached the controller
    texts: list[str] = field(default_factory=list)  # text delta of each token


@dataclass
class _Worker:
    worker_id: str
    role: str
    gpu_type: str
    handle: object  # Ray actor handle
    load: WorkerLoad
    alive: bool = True
    kv_endpoint: str = ""
    cursor: int = 0  # a prefill worker's results after this one are new (decode: the follower's)
    outstanding_prefill: int = 0  # prompt tokens dispatched, not yet prefilled
    # dispatches its last reported load may not count yet -> when they were admitted
    # (wall clock; inf until then); dropped once a load taken after that arrives
    in_transit: dict[object, float] = field(default_factory=dict)
    retiring: bool = False  # being drained by retire_worker: routed no new work
    # requests whose KV reservation is no longer needed: released with the next
    # reserve_batch to this worker, or by a release_batch within RELEASE_DELAY_S
    releases: list[str] = field(default_factory=list)
    release_timer: asyncio.TimerHandle | None = None


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival_s: float  # time.time() at submit
    tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    route: Route | None = None
    generation: int = 0  # increases with each dispatch; stale results are dropped
    waited_rounds: int = 0
    prefix_hashes: tuple[int, ...] = ()
    timing: dict = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    followers: int = 0  # lazy stream_chunks calls: its tokens go to its output channel
    # set when a lazy follower must get a chunk now (finished, or the output channel failed)
    resync: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float | None = None
    decoding: bool = False  # admitted on its decode worker (prefill no longer needed)
    score: float | None = None  # ranker score on arrival (higher = shorter); None until scored
    placement: Placement = Placement(0.0, 0)  # decode-side rank, set at dispatch
    prefill_tokens: int = 0  # charged to its prefill worker's queue until the result is in
    transit: object | None = None  # its key in its decode worker's in_transit
    _view: RequestView | None = None  # cached by view()
    _view_key: tuple = ()

    def view(self) -> RequestView:
        """Rebuilt only when what it shows changed: a round that dispatches
        nothing reuses the views of every waiting request."""
        key = (len(self.tokens), self.waited_rounds, self.score, len(self.prefix_hashes))
        if self._view is None or self._view_key != key:
            left = self.params.max_tokens - len(self.tokens)
            p = self.params  # with EOS ignored and no stop condition, max_tokens is the true length
            known = left if p.ignore_eos and not p.stop and not p.stop_token_ids else None
            self._view = RequestView(self.request_id, len(self.prompt) + len(self.tokens), left,
                                     self.arrival_s, self.waited_rounds, self.score, known,
                                     prefix_hashes=self.prefix_hashes)
            self._view_key = key
        return self._view


def _load_ranker(config: ClusterConfig, redis):
    if config.scheduler.policy != "ltr" and not config.ranker.log_completions:
        return None
    from cluster.ranker.service import RankerService

    return RankerService.build(config, redis)


class Controller:
    def __init__(self, config: ClusterConfig, workers: dict[str, tuple[str, str, object]],
                 redis_password: str | None = None):
        """``workers``: worker id -> (role, gpu type, actor handle)."""
        self.config = config
        self._worker_args = workers
        self.scheduler = scheduler_from_spec(config.scheduler)
        self.router = make_router(config.router.policy)
        self.admission = BoundedQueue(config.admission.max_waiting)
        if redis_password is None:
            redis_password = password_from_env(config.redis.password_env)
        self.store = StateStore(config.redis.url, config.redis.namespace, redis_password)
        self._redis_password = redis_password  # for the output channels; never logged
        self.follower = TokenFollower(config.redis.url, redis_password, self._on_token_step,
                                      self._on_worker_died)  # decode workers' token events
        self._out: RespConnection | None = None  # requests' output channels (publishing)
        self._out_lock = asyncio.Lock()
        self.journal = JournalBatcher(self.store)  # one Redis pipeline per event-loop tick
        self.workers: dict[str, _Worker] = {}
        self._requests: dict[str, _Request] = {}
        self._waiting: dict[str, _Request] = {}  # insertion-ordered
        self._admitting: set[str] = set()  # accepted, journal write in flight
        self._finished_order: deque[_Request] = deque()  # by finished_at, to forget them
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()  # set once workers are connected and the journal replayed
        self._round = 0
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        # dispatch numbers, increasing across controller restarts: results of a
        # previous controller's dispatches never pass for current ones
        self._generations = itertools.count(time.time_ns() // 1000)
        self.block_size = min(p.block_size for p in config.pools)
        self.ranker = None  # cluster.ranker.service.RankerService, loaded in start() if needed
        self.metrics = ServingMetrics(config.transport if config.disaggregated else "none",
                                      self._snapshot)

    # ----- lifecycle ----------------------------------------------------------
    async def start(self) -> int:
        """Connect workers and Redis, recover in-flight requests; returns how
        many were recovered."""
        await self.store.ping()
        for wid, (role, gpu_type, handle) in self._worker_args.items():
            load = await handle.load.remote()
            w = _Worker(wid, role, gpu_type, handle, load)
            if role != "prefill":
                w.kv_endpoint = await handle.kv_endpoint.remote()
            self.workers[wid] = w
        info = await next(iter(self.workers.values())).handle.model_info.remote()
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.ranker = await asyncio.to_thread(_load_ranker, self.config, self.store.r)
        recovered = await self._recover()
        for w in self.workers.values():
            await self._attach(w)
        self._spawn(self._schedule_loop())
        self._spawn(self._ticker())
        self.follower.start()
        self._ready.set()
        return recovered

    async def _attach(self, w: _Worker) -> None:
        """Start following a worker from now on (the results or events of
        dispatches before us are skipped): a decode (or mixed) worker's token
        events through the follower, a prefill worker's results here."""
        if w.role != "prefill":
            w.load = await self.follower.follow(w.worker_id, w.handle)
            return
        _, w.cursor, w.load = await w.handle.next_results.remote(1 << 62, 0.0)
        self._spawn(self._poll_prefill(w))

    async def _recover(self) -> int:
        entries = await self.store.inflight()
        for e in entries:
            await asyncio.gather(*(self._safe(w, "abort", e.request_id)
                                   for w in self.workers.values()))
            req = _Request(e.request_id, e.prompt_token_ids, e.params, e.arrival_s,
                           list(e.token_ids), list(e.texts), [time.time()] * len(e.token_ids))
            req.prefix_hashes = self._prefix_hashes(req.prompt)
            self._requests[req.request_id] = req
            self._waiting[req.request_id] = req
            if self.ranker is not None:
                self._spawn(self._rank(req))
        self._wake.set()
        return len(entries)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- client API -----------------------------------------------------------
    async def submit(self, request_id: str | None, prompt_token_ids: list[int],
                     params: SamplingParams) -> str:
        """Queue a request; ``ValueError`` for bad input, ``Overloaded`` when full,
        ``Unavailable`` when it could not be journaled. Returns once journaled
        (concurrent submits share one Redis pipeline)."""
        await self._ready.wait()
        req = self._new_request(request_id, prompt_token_ids, params)
        await self._journal_and_queue([req], [self.journal.new(
            req.request_id, req.prompt, req.params, req.arrival_s)])
        return req.request_id

    async def submit_many(self, items: list[SubmitItem]) -> list[SubmitOutcome]:
        """``submit`` for several requests in one call (one journal pipeline);
        each item gets its own outcome, a refusal never affects the others."""
        await self._ready.wait()
        outcomes, reqs = [], []
        for it in items:
            try:
                reqs.append(self._new_request(it.request_id, it.prompt_token_ids, it.params))
                outcomes.append(SubmitOutcome(reqs[-1].request_id))
            except (ValueError, Overloaded) as exc:
                outcomes.append(SubmitOutcome(it.request_id, type(exc).__name__, str(exc)))
        futs = [self.journal.new(r.request_id, r.prompt, r.params, r.arrival_s) for r in reqs]
        try:
            await self._journal_and_queue(reqs, futs)
        except Unavailable as exc:
            return [o if o.error else replace(o, error="Unavailable", message=str(exc))
                    for o in outcomes]
        return outcomes

    def _new_request(self, request_id: str | None, prompt_token_ids: list[int],
                     params: SamplingParams) -> _Request:
        """Validate and admit (raises ``ValueError`` / ``Overloaded``); the
        request is reserved until journaled."""
        rid = request_id or f"req-{next(self._ids)}-{int(time.time() * 1e3)}"
        if rid in self._requests or rid in self._admitting:
            raise ValueError(f"request_id {rid!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        params.validate(len(prompt_token_ids), self.max_model_len)
        req = _Request(rid, list(prompt_token_ids), params, time.time())
        req.prefix_hashes = self._prefix_hashes(req.prompt)
        decision = self.admission.admit(len(self._waiting) + len(self._admitting), req.view())
        if not decision.accepted:
            raise Overloaded(decision.reason)
        self._admitting.add(rid)
        return req

    def _prefix_hashes(self, prompt: list[int]) -> tuple[int, ...]:
        """Block hashes of the prompt, for the prefix-aware router only."""
        if self.config.router.policy != "prefix-aware":
            return ()
        return tuple(block_hashes(prompt, self.block_size))

    async def _journal_and_queue(self, reqs: list[_Request], journaled: list) -> None:
        """Queue requests once their journal entries are written."""
        try:
            await asyncio.gather(*journaled)
        except Exception as exc:  # noqa: BLE001 - the journal write failed (Redis away)
            raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None
        finally:
            self._admitting.difference_update(r.request_id for r in reqs)
        for req in reqs:
            self._requests[req.request_id] = req
            self._waiting[req.request_id] = req
            if self.ranker is not None:
                self._spawn(self._rank(req))
        self._wake.set()

    async def _rank(self, req: _Request) -> None:
        """Score a queued request (batched with others arriving meanwhile);
        until then the ltr policy ranks it after every scored request."""
        if self.ranker is None:
            return
        t0 = time.time()
        score = await self.ranker.on_arrival(req.request_id, req.prompt)
        req.score = UNRANKED if score is None else score  # (None: the encoder failed on it)
        req.timing["rank_s"] = time.time() - t0
        self._wake.set()

    async def swap_ranker(self, head: str | bytes) -> dict:
        """Replace the ranker's head (a path this process can read, or the
        file's bytes) while requests keep flowing."""
        if self.ranker is None:
            raise ValueError("no ranker is loaded: scheduler.policy is not 'ltr' and "
                             "ranker.log_completions is off")
        return await asyncio.to_thread(self.ranker.swap, head)

    async def ranker_report(self) -> dict | None:
        """Prompts scored, encoder batches and busy seconds, online tau."""
        return None if self.ranker is None else self.ranker.report()

    async def stream(self, request_id: str, cursor: int = 0, timeout_s: float = 5.0) -> StreamChunk:
        """Tokens after ``cursor``; waits up to ``timeout_s`` for at least one."""
        req = await self._request(request_id)
        if len(req.tokens) <= cursor and req.finish_reason is None:
            req.changed.clear()
            await wait_event(req.changed, timeout_s)
        return _chunk(req, cursor)

    async def stream_chunks(self, request_id: str, cursor: int = 0, idle_s: float = 5.0,
                            lazy: bool = False):
        """``stream`` as an async generator, called with ``num_returns="streaming"``:
        one chunk as soon as tokens after ``cursor`` exist (an empty one after
        ``idle_s`` without any), until the finished chunk. One Ray call per
        request instead of one per chunk.

        ``lazy`` (the caller subscribed to the request's output channel, see
        ``token_channel``): the tokens after ``cursor`` at once, then only the
        finished chunk and, every ``idle_s``, whatever is new (a safety net
        for lost messages); every token while the channel is down."""
        if not lazy:
            while True:
                chunk = await self.stream(request_id, cursor, idle_s)
                cursor = chunk.cursor
                yield chunk
                if chunk.finished:
                    return
        req = await self._request(request_id)
        req.followers += 1
        try:
            await self._open_output()
            while True:
                chunk = _chunk(req, cursor)
                cursor = chunk.cursor
                yield chunk
                if chunk.finished:
                    return
                await self._await_lazy(req, cursor, idle_s)
        finally:
            req.followers -= 1

    async def token_channel(self) -> dict | None:
        """Where a driver client subscribes to requests' output channels: the
        Redis URL without credentials, the namespace, and the NAME of the
        environment variable holding the password (never the password)."""
        if await self._open_output() is None:
            return None
        return {"url": _public_url(self.config.redis.url), "namespace": self.config.redis.namespace,
                "password_env": self.config.redis.password_env}

    async def _request(self, request_id: str) -> _Request:
        await self._ready.wait()
        req = self._requests.get(request_id) or await self._from_journal(request_id)
        if req is None:
            raise UnknownRequest(request_id)
        return req

    async def _await_lazy(self, req: _Request, cursor: int, idle_s: float) -> None:
        """Until a lazy follower needs a chunk: the request finished or the
        output channel failed (``resync``), ``idle_s`` passed, or (channel
        down) a new token."""
        if self._out is None or not self._out.healthy:
            if len(req.tokens) <= cursor and req.finish_reason is None:
                req.changed.clear()
                await wait_event(req.changed, idle_s)
            return
        req.resync.clear()
        if req.finish_reason is None:
            await wait_event(req.resync, idle_s)

    async def _open_output(self) -> RespConnection | None:
        """The connection requests' tokens are published on (None if Redis
        cannot be reached: followers then get every token through Ray)."""
        async with self._out_lock:
            if self._out is None or not self._out.healthy:
                try:
                    self._out = await RespConnection.open(self.config.redis.url,
                                                          self._redis_password)
                except (OSError, redis.RedisError, asyncio.TimeoutError) as exc:
                    log.warning("cannot open the output channels (%s)", type(exc).__name__)
                    self._out = None
            return self._out

    def _publish_tokens(self, req: _Request, start: int, now: float) -> None:
        """Tokens ``start:`` of a followed request on its output channel."""
        try:
            self._out.publish_nowait(
                output_channel(self.config.redis.namespace, req.request_id),
                encode_tokens(start, req.tokens[start:], req.texts[start:], now))
        except (OSError, redis.RedisError):
            self._out = None  # the next lazy call reopens it
            for r in self._requests.values():
                if r.followers:
                    r.resync.set()  # their followers get tokens through Ray meanwhile

    async def _from_journal(self, request_id: str) -> _Request | None:
        """A request finished under a previous controller, still in the journal."""
        e = await self.store.lookup(request_id)
        if e is None or e.state != "finished":
            return None
        req = _Request(e.request_id, e.prompt_token_ids, e.params, e.arrival_s,
                       list(e.token_ids), list(e.texts), finish_reason=e.finish_reason,
                       finished_at=time.time())
        self._requests[request_id] = req
        self._finished_order.append(req)
        return req

    async def cancel(self, request_id: str) -> bool:
        """Idempotent: True if the request was running and is now aborted."""
        await self._ready.wait()
        req = self._requests.get(request_id)
        if req is None or req.finish_reason is not None:
            return False
        self._waiting.pop(request_id, None)
        route = req.route
        req.generation = next(self._generations)
        await self._finish(req, "abort")
        if route is not None:
            ids = {route.prefill_worker, route.decode_worker}
            await asyncio.gather(*(self._safe(self.workers[w], "abort", request_id) for w in ids))
        return True

    async def start_frontends(self, grpc_port: int | None = None,
                              http_port: int | None = None) -> dict:
        """Serve gRPC and HTTP from this process's event loop; the bearer token
        is read from the environment variable the config names (never from
        arguments). Port 0 picks a free port; the bound ports are returned."""
        import os

        from cluster.chat_template import load_chat_renderer
        from cluster.grpc_server import GrpcFrontend
        from cluster.http_server import HttpFrontend
        from cluster.validation import ModelLimits
        from workers.loader import load_tokenizer

        server = self.config.server
        token = os.environ.get(server.auth_token_env) if server.auth_token_env else None
        limits = ModelLimits(self.config.model.served_name, self.max_model_len, self.vocab_size)
        tokenizer = load_tokenizer(self.config.model.source)
        render = load_chat_renderer(self.config.model.source)
        self.grpc = GrpcFrontend(self, limits, tokenizer, token, server.max_message_bytes,
                                 render=render)
        self.http = HttpFrontend(self, limits, tokenizer, token, server.max_message_bytes,
                                 render=render)
        ports = {"grpc_port": await self.grpc.start(
            server.host, server.grpc_port if grpc_port is None else grpc_port)}
        ports["http_port"] = await self.http.start(
            server.host, server.http_port if http_port is None else http_port)
        return ports

    def _frontends(self) -> list:
        return [f for f in (getattr(self, "grpc", None), getattr(self, "http", None)) if f]

    async def drain_frontends(self) -> None:
        """Health turns NOT_SERVING / 503 and new requests are refused."""
        for f in self._frontends():
            await f.drain()

    async def stop_frontends(self, grace_s: float = 30.0) -> None:
        await self.drain_frontends()
        await asyncio.gather(*(f.stop(grace_s) for f in self._frontends()))

    async def status(self) -> dict:
        return {
            "name": self.config.name,
            "waiting": len(self._waiting),
            "running": sum(1 for r in self._requests.values()
                           if r.route is not None and r.finish_reason is None),
            "workers": [{"worker_id": w.worker_id, "role": w.role, "gpu_type": w.gpu_type,
                         "alive": w.alive, "running": w.load.running,
                         "events_via": None if w.role == "prefill" else
                         "redis" if self.follower.via_redis(w.worker_id) else "ray",
                         "free_kv_blocks": w.load.free_kv_blocks,
                         "total_kv_blocks": w.load.total_kv_blocks,
                         "device": w.load.device_name} for w in self.workers.values()],
        }

    def _snapshot(self) -> ClusterSnapshot:
        """Read at /metrics scrape time (same event loop: a consistent view)."""
        front = "prefill" if self.config.disaggregated else "mixed"
        waiting = {front: len(self._waiting)}
        if self.config.disaggregated:  # first token out, not yet admitted for decode
            waiting["decode"] = sum(1 for r in self._requests.values() if r.route and r.tokens
                                    and not r.decoding and r.finish_reason is None)
        return ClusterSnapshot(waiting, [(w.worker_id.split("/")[-2], w.load)
                                         for w in self.workers.values()])

    async def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    # ----- replicas joining and leaving (cluster/autoscaler.py) ---------------------
    async def add_worker(self, worker_id: str, role: str, gpu_type: str, handle) -> bool:
        """Start routing to a new, ready worker; False if it is already known."""
        await self._ready.wait()
        if worker_id in self.workers:
            return False
        w = _Worker(worker_id, role, gpu_type, handle, await handle.load.remote())
        if role != "prefill":
            w.kv_endpoint = await handle.kv_endpoint.remote()
        await self._attach(w)
        self.workers[worker_id] = w
        self._wake.set()
        return True

    async def retire_worker(self, worker_id: str, drain_timeout_s: float = 120.0) -> int:
        """Route no new work to a worker, let its requests finish for up to
        ``drain_timeout_s``, re-queue the rest (re-prefilled elsewhere with the
        tokens already streamed, as when a worker dies), then forget it; it may
        be killed after. Returns how many requests were moved."""
        await self._ready.wait()
        w = self.workers.get(worker_id)
        if w is None:
            return 0
        w.retiring = True
        deadline = time.monotonic() + drain_timeout_s
        while w.alive and self._routed_to(w) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        moved = [r.request_id for r in self._routed_to(w)] if w.alive else []
        await self._mark_dead(w)  # re-queues what is left; ends its poll loop
        for rid in moved:  # its events for them are no longer accepted
            try:
                await w.handle.abort.remote(rid)
            except RayActorError:
                break
        self.workers.pop(worker_id, None)
        return len(moved)

    def _routed_to(self, w: _Worker) -> list[_Request]:
        return [r for r in self._requests.values() if r.finish_reason is None and r.route
                and (w.worker_id == r.route.decode_worker
                     or w.worker_id == r.route.prefill_worker and not r.decoding)]

    async def pool_load(self, pool: str) -> PoolLoad:
        """The autoscaler's input for one pool (workers are named <cluster>/<pool>/<i>)."""
        mine = [w for w in self.workers.values() if w.worker_id.split("/")[-2] == pool]
        ready = [self._view(w) for w in mine if w.alive and not w.retiring]
        return measure_pool(pool, ready, [r.view() for r in self._waiting.values()],
                            [w.worker_id for w in mine if not w.alive])

    async def observe_scaling(self, decision: ScalingDecision, ready: int, pending: int) -> None:
        self.metrics.observe_scaling(decision.pool, decision.action, decision.desired_replicas,
                                     ready, pending)

    # ----- scheduling -------------------------------------------------------------
    async def _ticker(self) -> None:
        for tick in itertools.count():
            await asyncio.sleep(0.05)
            if self._waiting:
                self._wake.set()
            self._forget_finished()
            if tick % 10 == 0:
                self._spawn(self._refresh_prefill_loads())

    async def _refresh_prefill_loads(self) -> None:
        """Decode loads come with every token poll; prefill loads (for status
        and metrics) are read twice a second."""
        for w in [w for w in self.workers.values() if w.role == "prefill" and w.alive]:
            load = await self._safe(w, "load")
            if load is not None:
                w.load = load

    async def _schedule_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._schedule_round()

    async def _schedule_round(self) -> None:
        if not self._waiting:
            return
        rnd = SchedulingRound(time.time(), self._round, tuple(
            r.view() for r in self._waiting.values()))
        self._round += 1
        prefill, decode = self._views()
        dispatched: list[_Request] = []
        for view in self.scheduler.order(rnd):
            if self.scheduler.hold_until(view, rnd.now_s) is not None:
                break  # waiting for its score (the ticker wakes the loop when that ends)
            hits = await self._prefix_hits(view)
            route = self.router.route(view, prefill, decode, hits)
            if route is None:
                break
            dispatched.append(self._dispatch(self._waiting.pop(view.request_id), route))
            prefill, decode = self._charge(prefill, decode, view, route)
        if dispatched:
            for req in self._waiting.values():
                req.waited_rounds += 1
            self._spawn(self._launch(dispatched))

    async def _prefix_hits(self, view: RequestView) -> dict[str, int]:
        if self.config.router.policy != "prefix-aware":
            return {}
        return await self.store.prefix_hits(list(view.prefix_hashes))

    def _views(self) -> tuple[list[WorkerView], list[WorkerView]]:
        views = {w.worker_id: self._view(w) for w in self.workers.values()
                 if w.alive and not w.retiring}
        if self.config.disaggregated:
            return ([v for v in views.values() if v.role == "prefill"],
                    [v for v in views.values() if v.role == "decode"])
        mixed = [v for v in views.values() if v.role == "mixed"]
        return mixed, mixed

    def _view(self, w: _Worker) -> WorkerView:
        load = w.load
        # A prefill worker's own count lags its queue; what was dispatched to it is exact.
        queued = w.outstanding_prefill if w.role == "prefill" else load.queued_prefill_tokens
        # Requests sent but not yet in its polled load hold batch slots too (a
        # burst would otherwise overshoot max_num_seqs into the worker's FIFO queue).
        running = load.running + len(w.in_transit)
        return WorkerView(w.worker_id, w.role, w.gpu_type, queued, running,
                          load.free_kv_blocks, load.total_kv_blocks, load.block_size,
                          load.max_num_batched_tokens, load.max_num_seqs, w.alive)

    def _charge(self, prefill, decode, view: RequestView, route: Route):
        """Account a dispatch in this round's views so the next pick sees it."""
        def upd(v: WorkerView) -> WorkerView:
            if v.worker_id == route.decode_worker:
                v = replace(v, running=v.running + 1, free_kv_blocks=v.free_kv_blocks
                            - v.kv_blocks_for(view.prompt_tokens + view.max_tokens))
            if v.worker_id == route.prefill_worker:
                v = replace(v, queued_prefill_tokens=v.queued_prefill_tokens + view.prompt_tokens)
            return v
        new_decode = [upd(v) for v in decode]
        return (new_decode if prefill is decode else [upd(v) for v in prefill]), new_decode

    # ----- dispatch: one call per worker per scheduling round ---------------------------
    def _dispatch(self, req: _Request, route: Route) -> _Request:
        req.route = route
        req.generation = next(self._generations)
        req.placement = self.scheduler.placement(req.view(), time.time())
        if "queue_s" not in req.timing:
            req.timing["queue_s"] = time.time() - req.arrival_s
            self.metrics.observe_queue(self.workers[route.prefill_worker].role,
                                       req.timing["queue_s"])
        self._transit_begin(req)
        if route.prefill_worker != route.decode_worker:  # its prompt counts in P's queue now
            req.prefill_tokens = len(req.prompt) + len(req.tokens)
            self.workers[route.prefill_worker].outstanding_prefill += req.prefill_tokens
        self.journal.route(req.request_id, route.prefill_worker, route.decode_worker)
        return req

    async def _launch(self, reqs: list[_Request]) -> None:
        """Start a round's dispatches: colocated ones with one ``submit_batch``
        per mixed worker; disaggregated ones with one ``reserve_batch`` per
        decode worker, then one ``submit_prefills`` per prefill worker (their
        results come back through ``_poll_prefill``)."""
        gens = {r.request_id: r.generation for r in reqs}
        mixed, split = _Groups(), _Groups()
        for r in reqs:
            colocated = r.route.prefill_worker == r.route.decode_worker
            (mixed if colocated else split).add(r.route.decode_worker, r)
        reserved = await asyncio.gather(
            *(self._batch(w, rs, gens, self._submit_mixed) for w, rs in mixed.items()),
            *(self._batch(w, rs, gens, self._reserve) for w, rs in split.items()))
        by_prefill = _Groups()
        for r in (r for rs in reserved for r in rs):
            by_prefill.add(r.route.prefill_worker, r)
        await asyncio.gather(*(self._batch(w, rs, gens, self._start_prefills)
                               for w, rs in by_prefill.items()))

    async def _batch(self, worker_id: str, reqs: list[_Request], gens: dict[str, int],
                     step) -> list[_Request]:
        """Run one batched worker call for ``reqs``; a dead worker re-queued
        them (``_mark_dead``), any other failure aborts those still current."""
        w = self.workers[worker_id]
        try:
            return await step(w, reqs, gens)
        except WorkerDied:
            return []
        except Exception as exc:  # noqa: BLE001 - a failed request ends, never hangs
            log.warning("%s on %s failed for %d requests: %s", step.__name__, w.worker_id,
                        len(reqs), exc)
            for r in reqs:
                if self._current(r, gens):
                    r.timing["error"] = str(exc)
                    await self._finish(r, "abort")
            return []

    def _current(self, req: _Request, gens: dict[str, int]) -> bool:
        return req.generation == gens.get(req.request_id) and req.finish_reason is None

    async def _submit_mixed(self, w: _Worker, reqs: list[_Request], gens) -> list:
        errors = await self._call(w, "submit_batch", [AdmitItem(
            r.request_id, r.prompt, list(r.tokens), r.params, r.placement.priority,
            r.placement.boost_steps) for r in reqs])
        for r, error in zip(reqs, errors):
            self._transit_end(r)
            if error and self._current(r, gens):
                r.timing["error"] = error
                await self._finish(r, "abort")
        return []

    async def _reserve(self, d: _Worker, reqs: list[_Request], gens) -> list[_Request]:
        """KV reservations on one decode worker; returns those that got one and
        are still current (the others wait for room, or are released)."""
        release = self._take_releases(d)
        blocks = await self._call(d, "reserve_batch", [ReserveItem(
            r.request_id, r.prompt + r.tokens, r.generation) for r in reqs], release)
        ready, stale = [], []
        for r, b in zip(reqs, blocks):
            if b is None:  # raced with other reservations: wait for room
                self._requeue(r, gens[r.request_id])
            elif isinstance(b, str):  # refused: this request ends, the others go on
                if self._current(r, gens):
                    r.timing["error"] = b
                    await self._finish(r, "abort")
            elif self._current(r, gens):
                ready.append(r)
            else:
                stale.append(r.request_id)
        if stale:
            await self._safe(d, "release_batch", stale)
        return ready

    async def _start_prefills(self, p: _Worker, reqs: list[_Request], gens) -> list:
        jobs = [PrefillJob(r.request_id, r.prompt, list(r.tokens), r.params,
                           self.workers[r.route.decode_worker].kv_endpoint, r.generation)
                for r in reqs]
        errors = await self._call(p, "submit_prefills", jobs)
        for r, error in zip(reqs, errors):
            if error:
                self._uncharge_prefill(r)
                if self._current(r, gens):
                    r.timing["error"] = error
                    await self._finish(r, "abort")
                await self._safe(self.workers[r.route.decode_worker], "release", r.request_id)
        return []

    async def _on_prefill_results(self, p: _Worker, results: list[PrefillResult]) -> None:
        """First tokens of a batch of prefills: delivered (one journal write),
        then one ``admit_batch`` / ``release_batch`` per decode worker."""
        live: list[tuple[_Request, PrefillResult]] = []
        admit, release = _Groups(), _Groups()
        for res in results:
            req = self._requests.get(res.request_id)
            if req is None or req.generation != res.generation:
                continue  # stale: whoever re-dispatched or cancelled it freed its blocks
            self._uncharge_prefill(req)
            if req.finish_reason is not None:  # ended meanwhile (a failed call): free its KV
                if req.route is not None:
                    release.add(req.route.decode_worker, req)
            elif res.aborted:
                self._requeue(req, req.generation)
            else:
                live.append((req, res))
        self._wake.set()
        for req, res in live:
            self._record_prefill(req, res)
        await asyncio.gather(*(self._store_prefix(p.worker_id, req) for req, _ in live))
        await self._deliver(None, [TokenEvent(req.request_id, [res.token_id], res.text,
                                              res.finish_reason) for req, res in live])
        for req, res in live:
            if res.finish_reason is None and req.finish_reason is None:
                admit.add(req.route.decode_worker, req)
            else:
                self._transit_drop(req)
                release.add(req.route.decode_worker, req)
        for d, rs in release.items():
            self._release_later(self.workers[d], [r.request_id for r in rs])
        await asyncio.gather(*(self._admit(self.workers[d], rs) for d, rs in admit.items()))

    def _release_later(self, d: _Worker, request_ids: list[str]) -> None:
        """Free reservations with the next round's ``reserve_batch`` to ``d``,
        or with one ``release_batch`` after ``RELEASE_DELAY_S`` if none comes."""
        d.releases += request_ids
        if d.release_timer is None:
            d.release_timer = asyncio.get_running_loop().call_later(
                RELEASE_DELAY_S, lambda: self._spawn(self._flush_releases(d)))

    def _take_releases(self, d: _Worker) -> list[str]:
        if d.release_timer is not None:
            d.release_timer.cancel()
            d.release_timer = None
        release, d.releases = d.releases, []
        return release

    async def _flush_releases(self, d: _Worker) -> None:
        release = self._take_releases(d)
        if release:
            await self._safe(d, "release_batch", release)

    async def _admit(self, d: _Worker, reqs: list[_Request]) -> None:
        gens = {r.request_id: r.generation for r in reqs}
        try:
            outcomes = await self._call(d, "admit_batch", [AdmitItem(
                r.request_id, r.prompt, list(r.tokens), r.params, r.placement.priority,
                r.placement.boost_steps, r.generation) for r in reqs], 60.0)
        except WorkerDied:
            return
        for r, outcome in zip(reqs, outcomes):
            r.timing["kv_admission"] = outcome
            r.decoding = r.generation == gens[r.request_id] and outcome != "aborted"
            self._transit_end(r)
            if outcome == "aborted":  # its reservation was gone (lease expired): again
                self._requeue(r, gens[r.request_id])

    def _transit_begin(self, req: _Request) -> None:
        """Count it in its decode worker's batch until the worker's load does."""
        self._transit_drop(req)
        req.transit = object()
        self.workers[req.route.decode_worker].in_transit[req.transit] = float("inf")

    def _transit_end(self, req: _Request) -> None:
        """Admitted (or submitted): dropped once a load taken after now arrives."""
        w = self.workers.get(req.route.decode_worker) if req.route else None
        if req.transit is not None and w is not None and req.transit in w.in_transit:
            w.in_transit[req.transit] = time.time()
        req.transit = None

    def _transit_drop(self, req: _Request) -> None:
        """Never admitted (finished at prefill, re-queued, cancelled)."""
        if req.transit is not None:
            for w in self.workers.values():
                w.in_transit.pop(req.transit, None)
        req.transit = None

    def _uncharge_prefill(self, req: _Request) -> None:
        if req.prefill_tokens and req.route is not None:
            p = self.workers.get(req.route.prefill_worker)
            if p is not None:
                p.outstanding_prefill -= req.prefill_tokens
        req.prefill_tokens = 0

    def _record_prefill(self, req: _Request, res: PrefillResult) -> None:
        t = req.timing
        t["prefill_queue_s"] = res.queue_s
        t["prefill_s"] = res.prefill_s
        t["kv_transfer_s"] = res.transfer_s
        t["kv_bytes"] = t.get("kv_bytes", 0) + res.kv_bytes
        t["kv_transfer_attempts"] = res.transfer_attempts
        self.metrics.observe_transfer(res.kv_bytes, res.transfer_s, res.transfer_attempts,
                                      res.transfer_ok)

    async def _store_prefix(self, worker_id: str, req: _Request) -> None:
        if self.config.router.policy == "prefix-aware":
            await self.store.index_prefix(worker_id, list(req.prefix_hashes))

    def _requeue(self, req: _Request, gen: int) -> None:
        if req.generation != gen or req.finish_reason is not None:
            return
        self._uncharge_prefill(req)
        self._transit_drop(req)
        req.route = None
        req.decoding = False
        req.generation = next(self._generations)
        self._waiting[req.request_id] = req
        self._wake.set()

    # ----- token delivery --------------------------------------------------------------
    async def _poll_prefill(self, p: _Worker) -> None:
        """Follow a prefill worker until it dies or is retired, through its
        ``stream_results`` generator; each batch of results is handled in a
        task of its own (admission may wait for KV verdicts) while the stream
        goes on."""
        while p.alive:
            gen = p.handle.stream_results.options(num_returns="streaming").remote(p.cursor)
            try:
                async for ref in gen:
                    results, p.cursor, p.load = await ref
                    if results:
                        self._spawn(self._on_prefill_results(p, results))
                    if not p.alive:
                        break
            except (RayActorError, WorkerDied):
                await self._mark_dead(p)
                return
            except Exception:  # noqa: BLE001 - re-follow; a dead worker fails the ping
                log.exception("following %s failed", p.worker_id)
                await asyncio.sleep(0.1)
                if await self._safe(p, "ping") is None:
                    return
            finally:
                cancel_stream(gen)

    async def _on_token_step(self, step: TokenStep) -> None:
        """A decode worker's events, in order and each once (from the follower)."""
        w = self.workers.get(step.worker_id)
        if w is None:  # still being added (its events are nobody's yet) or retired
            return
        w.load = step.load or w.load
        if step.load_at:
            self._landed(w, step.load_at)
        await self._on_token_events(w, step.events)

    async def _on_worker_died(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            await self._mark_dead(w)

    def _landed(self, w: _Worker, load_at: float) -> None:
        """Requests the worker's load (taken at ``load_at``) counts already."""
        for k in [k for k, t in w.in_transit.items() if t < load_at]:
            del w.in_transit[k]

    async def _on_token_events(self, w: _Worker, events: list[TokenEvent]) -> None:
        """Deliver in order; a failure is logged and the stream goes on
        (requests must not stall)."""
        mine = [e for e in events if self._owned_by(e.request_id, w.worker_id)]
        try:
            if mine:
                await self._deliver(None, mine)
        except Exception:  # noqa: BLE001
            log.exception("delivering %d events from %s failed", len(mine), w.worker_id)
        self._wake.set()

    def _owned_by(self, request_id: str, worker_id: str) -> bool:
        req = self._requests.get(request_id)
        return (req is not None and req.finish_reason is None and req.route is not None
                and req.route.decode_worker == worker_id)

    async def _deliver(self, req: _Request | None, events: list[TokenEvent]) -> None:
        now = time.time()
        batch = []
        for ev in events:
            r = req or self._requests[ev.request_id]
            n = len(ev.token_ids)
            if not r.tokens:
                r.timing["ttft_s"] = now - r.arrival_s
                self.metrics.observe_ttft(r.timing["ttft_s"])
            self.metrics.observe_tokens(r.token_times[-1] if r.token_times else None, now, n)
            start = len(r.tokens)
            texts = [ev.text] if n == 1 else [ev.text] + [""] * (n - 1)
            r.tokens += ev.token_ids
            r.texts += texts
            r.token_times += [now] * n
            batch.append((r.request_id, ev.token_ids, texts))
            if r.followers and self._out is not None:
                self._publish_tokens(r, start, now)
            if ev.finish_reason is None:
                r.changed.set()  # stream now; the journal follows (replay is token-exact)
        self.journal.tokens(batch)  # write-behind; a failure only costs recovery a replay
        for ev in events:
            if ev.finish_reason is not None:
                await self._finish(req or self._requests[ev.request_id], ev.finish_reason)

    async def _finish(self, req: _Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        req.finished_at = time.time()
        self._finished_order.append(req)
        req.timing["total_s"] = req.finished_at - req.arrival_s
        self.metrics.observe_finish(reason, req.timing["total_s"])
        self._uncharge_prefill(req)
        self._transit_drop(req)
        self.journal.finish(req.request_id, reason, {
            "prompt_tokens": len(req.prompt), "output_tokens": len(req.tokens)})
        if self.ranker is not None:
            await self.ranker.on_finish(req.request_id, len(req.tokens), reason)
        req.changed.set()
        req.resync.set()
        self._wake.set()

    def _forget_finished(self, keep_s: float = 120.0) -> None:
        """Drop requests finished over ``keep_s`` ago (oldest first: O(forgotten))."""
        cutoff = time.time() - keep_s
        done = self._finished_order
        while done and done[0].finished_at < cutoff:
            req = done.popleft()
            if self._requests.get(req.request_id) is req:
                del self._requests[req.request_id]

    # ----- worker calls and failures -----------------------------------------------------
    async def _call(self, w: _Worker, method: str, *args):
        try:
            return await getattr(w.handle, method).remote(*args)
        except RayActorError as exc:
            await self._mark_dead(w)
            raise WorkerDied(w.worker_id) from exc

    async def _safe(self, w: _Worker, method: str, *args):
        """Best-effort call: a dead worker is noted, not raised."""
        if not w.alive:
            return None
        try:
            return await getattr(w.handle, method).remote(*args)
        except RayActorError:
            await self._mark_dead(w)
            return None

    async def _mark_dead(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        self.follower.unfollow(w.worker_id)
        hit = [r for r in self._requests.values() if r.finish_reason is None and r.route
               and (w.worker_id == r.route.decode_worker
                    or w.worker_id == r.route.prefill_worker and not r.decoding)]
        for req in hit:
            other = ({req.route.prefill_worker, req.route.decode_worker} - {w.worker_id})
            self._requeue(req, req.generation)
            for o in other:
                await self._safe(self.workers[o], "abort", req.request_id)


class _Groups(dict):
    """Requests grouped by worker id (one batched call each)."""

    def add(self, worker_id: str, req: _Request) -> None:
        self.setdefault(worker_id, []).append(req)


def _chunk(req: _Request, cursor: int) -> StreamChunk:
    """What a stream returns: the tokens after ``cursor``. After a controller
    restart the journal may hold fewer tokens than the caller has seen (they
    are being regenerated): its cursor never moves back."""
    end = max(cursor, len(req.tokens))
    texts = req.texts[cursor:end]
    return StreamChunk(req.request_id, req.tokens[cursor:end], "".join(texts), end,
                       req.finish_reason is not None, req.finish_reason,
                       dict(req.timing, arrival_s=req.arrival_s), req.token_times[cursor:end],
                       texts)


def _public_url(url: str) -> str:
    """``url`` without credentials (they never travel as Ray arguments)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query)
                       if k not in ("password", "username")])
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
