"""``DecodeWorker``: a Ray actor that receives KV, decodes, and streams tokens.

Lifecycle of a disaggregated request::

    reserve(rid, tokens)  -> blocks held under a lease; the KV receiver expects them
    (the prefill worker streams the KV straight into those blocks)
    admit(rid, ...)       -> waits until every block is verified, then the
                             request joins the continuous-batching loop; if the
                             transfer failed, the blocks are released and the
                             prompt is recomputed here instead
    event channel         -> with Redis configured, the engine thread
                             publishes each step's events (and its load when
                             it changed) as ONE message on this worker's Redis
                             channel (``event_channel()`` names it;
                             cluster/token_channel.py): no Ray call, no
                             event-loop wake-up per step
    stream_outputs(cursor) -> the controller follows the worker through a Ray
                             streaming generator: without the Redis channel,
                             one item per engine step with the events of all
                             its requests; with it (``events=False``), a
                             heartbeat every ``idle_s`` carrying the number of
                             events published so far, so the controller can
                             tell when the channel lost some
    next_outputs(cursor)  -> every event since ``cursor`` as a long-poll (also
                             how the controller fetches events a channel lost)
    finish / abort        -> blocks freed

Events are numbered in the worker's mailbox; the Redis messages and the Ray
items carry the same numbers, so the controller keeps each event once
whichever way it came.

The controller uses the batched forms (``reserve_batch``, which also carries
the releases of requests that ended at their first token, ``admit_batch``,
``release_batch``, ``submit_batch``): one Ray call per worker per scheduling
round, each running its items in one engine-thread command.

With role ``mixed`` (colocated baseline) the controller calls ``submit_batch``
and the same engine prefills and decodes. A reservation never admitted is
released when its lease expires. Each reservation remembers its dispatch
(generation): a new reservation drops whatever an older dispatch of the same
id left here, and only an admit of the same dispatch can use it (a late call
of a replaced controller cannot).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from cluster.token_channel import Publisher, encode_batch, events_channel
from kvtransfer import make_receiver
from kvtransfer.base import ReceiverCore, TransferState
from workers.engine import LLMEngine, RequestOutput
from workers.engine_loop import EngineLoop
from workers.mailbox import Mailbox
from workers.messages import AdmitItem, ReserveItem, TokenEvent, WorkerLoad
from workers.sampling import SamplingParams
from workers.worker_config import WorkerSpec, build_engine, model_info, start_heartbeat


class DecodeWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.engine: LLMEngine = build_engine(spec)
        self.receiver = make_receiver(spec.transport, ReceiverCore(self.engine.kv_cache.layers),
                                      device=spec.device)
        self._leases: dict[str, float] = {}  # request -> deadline (monotonic)
        self._dispatch: dict[str, int] = {}  # reserved request -> its dispatch (generation)
        self._events: Mailbox[TokenEvent] = Mailbox()
        self._arrivals: dict[str, tuple[float, ...]] = {}
        self.recomputed = 0  # requests whose KV transfer failed and were re-prefilled here
        self.heartbeat = start_heartbeat(spec, kv_endpoint=self.receiver.endpoint)
        self._load_snapshot = self._load(self.engine)
        self._load_at = time.time()  # when _load_snapshot was taken (wall clock)
        self._publisher = _event_publisher(spec)  # None: events go through Ray only
        self._step_events: tuple[int, list[TokenEvent]] | None = None  # not yet published
        self._published_load: WorkerLoad | None = None
        self.loop = EngineLoop(self.engine, self._on_outputs, self._after_step)

    # ----- actor methods --------------------------------------------------
    async def kv_endpoint(self) -> str:
        return self.receiver.endpoint

    async def reserve(self, request_id: str, token_ids: list[int]) -> list[int] | None:
        return await self.loop.call(lambda e: self._reserve(e, request_id, token_ids))

    async def reserve_batch(self, items: list[ReserveItem],
                            release: list[str] = ()) -> list[list[int] | str | None]:
        """``reserve`` for several requests in one call, after releasing the
        reservations of ``release`` (requests that ended at their first token:
        the controller sends them with its next round). Per item: the block
        ids, None where there is no room, or why it was refused (a str)."""
        def run(e: LLMEngine) -> list[list[int] | str | None]:
            for rid in release:
                self._drop(e, rid)
            return [self._reserve(e, it.request_id, it.token_ids, it.generation)
                    for it in items]
        return await self.loop.call(run)

    async def admit(self, request_id: str, prompt_token_ids: list[int],
                    output_token_ids: list[int], params: SamplingParams,
                    timeout_s: float = 60.0, priority: float = 0.0, boost_steps: int = 0) -> str:
        """"admitted" once the KV is verified; "recomputed" if it never was;
        "aborted" if the reservation is gone (cancelled, expired, or a stale
        call from a controller that has since been replaced)."""
        item = AdmitItem(request_id, prompt_token_ids, output_token_ids, params, priority,
                         boost_steps)
        return (await self.admit_batch([item], timeout_s))[0]

    async def admit_batch(self, items: list[AdmitItem], timeout_s: float = 60.0) -> list[str]:
        """``admit`` for several requests: waits for each one's KV verdict (in
        parallel), then admits them all in one engine-thread command."""
        states = await asyncio.gather(*(asyncio.to_thread(self.receiver.wait, it.request_id,
                                                          timeout_s) for it in items))
        oks = [st is TransferState.SUCCESS for st in states]
        return await self.loop.call(
            lambda e: [self._admit(e, it, ok) for it, ok in zip(items, oks)])

    async def submit(self, request_id: str, prompt_token_ids: list[int],
                     output_token_ids: list[int], params: SamplingParams,
                     priority: float = 0.0, boost_steps: int = 0) -> None:
        """Prefill and decode here (mixed pool, or recovery); ``priority`` and
        ``boost_steps`` rank it under KV pressure (workers/sequence.py)."""
        await self.submit_batch([AdmitItem(request_id, prompt_token_ids, output_token_ids,
                                           params, priority, boost_steps)])

    async def submit_batch(self, items: list[AdmitItem]) -> list[str]:
        """``submit`` for several requests; per item "" or why it was refused."""
        return await self.loop.call(lambda e: [self._submit(e, it) for it in items])

    async def release(self, request_id: str) -> bool:
        return await self.loop.call(lambda e: self._drop(e, request_id))

    async def release_batch(self, request_ids: list[str]) -> list[bool]:
        return await self.loop.call(lambda e: [self._drop(e, rid) for rid in request_ids])

    async def abort(self, request_id: str) -> bool:
        return await self.loop.call(lambda e: self._drop(e, request_id))

    async def next_outputs(self, cursor: int, timeout_s: float = 1.0
                           ) -> tuple[list[TokenEvent], int, WorkerLoad]:
        """Events after ``cursor`` (waits up to ``timeout_s`` for one), the new
        cursor, and this worker's load. Events before ``cursor`` are dropped."""
        events, end = await self._events.since(cursor, timeout_s)
        # The snapshot the engine thread left after its last step: asking the
        # engine thread would make every poll wait for a step boundary.
        return events, end, self._load_snapshot

    async def stream_outputs(self, cursor: int, idle_s: float = 1.0, events: bool = True):
        """Async generator, called with ``num_returns="streaming"``: for each
        batch of events after ``cursor`` (or after ``idle_s`` without one, an
        empty batch) yields (events, the cursor after them, this worker's load
        or None if unchanged since the last item, the wall-clock time that load
        was taken: it counts every request admitted before then).

        ``events=False`` (the caller reads the Redis event channel): every
        ``idle_s`` a heartbeat ([], the number of events published so far,
        None, 0.0); loads travel with the channel's messages."""
        if not events:
            while True:
                await asyncio.sleep(idle_s)
                yield [], self._events.end(), None, 0.0
        sent = None
        async for batch, end in self._events.follow(cursor, idle_s):
            load = self._load_snapshot
            yield batch, end, None if load == sent else load, self._load_at
            sent = load

    async def event_channel(self) -> str | None:
        """The Redis channel this worker publishes its events to, while its
        publisher works; None otherwise (follow ``stream_outputs`` instead)."""
        p = self._publisher
        return p.channel if p is not None and p.healthy else None

    async def load(self) -> WorkerLoad:
        return await self.loop.call(self._load)

    async def free_blocks(self) -> int:
        return await self.loop.call(lambda e: e.blocks.num_free_blocks)

    async def receive_timeline(self, request_id: str) -> list[float]:
        """Wall-clock times each KV layer of a request landed verified."""
        return list(self._arrivals.get(request_id, ()))

    async def ping(self) -> str:
        return self.spec.worker_id

    async def node_id(self) -> str:
        """The Ray node this worker was placed on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def model_info(self) -> dict:
        return model_info(self.engine)

    # ----- engine thread ------------------------------------------------------
    def _reserve(self, e: LLMEngine, request_id: str, token_ids: list[int],
                 generation: int = 0) -> list[int] | str | None:
        # The controller reserves only for a new dispatch: whatever this worker
        # still holds under the id belongs to an older one (e.g. a late call of
        # a replaced controller) and goes.
        self._drop(e, request_id)
        try:
            blocks = e.reserve(request_id, token_ids)
        except ValueError as exc:
            return str(exc) or "refused"
        if blocks is not None:
            self.receiver.expect(request_id, blocks)
            self._leases[request_id] = time.monotonic() + self.spec.lease_s
            self._dispatch[request_id] = generation
        return blocks

    def _admit(self, e: LLMEngine, it: AdmitItem, kv_ok: bool) -> str:
        try:
            return self._admit_one(e, it, kv_ok)
        except ValueError:
            e.abort(it.request_id)
            return "aborted"

    def _admit_one(self, e: LLMEngine, it: AdmitItem, kv_ok: bool) -> str:
        # a late admit of an older dispatch must not take a newer reservation
        if not e.is_reserved(it.request_id) or self._dispatch.get(it.request_id) != it.generation:
            return "aborted"
        self._leases.pop(it.request_id, None)
        self._dispatch.pop(it.request_id, None)
        received = self.receiver.take(it.request_id)
        if received is not None:
            self._remember_arrivals(it.request_id, received.layer_arrival_s)
        if kv_ok:
            e.admit_prefilled(it.request_id, it.prompt_token_ids, it.output_token_ids,
                              it.params, it.priority, it.boost_steps)
            return "admitted"
        e.release(it.request_id)
        e.add_request(it.request_id, it.prompt_token_ids, it.params,
                      output_token_ids=it.output_token_ids, priority=it.priority,
                      boost_steps=it.boost_steps)
        self.recomputed += 1
        return "recomputed"

    def _submit(self, e: LLMEngine, it: AdmitItem) -> str:
        try:
            e.add_request(it.request_id, it.prompt_token_ids, it.params,
                          output_token_ids=it.output_token_ids, priority=it.priority,
                          boost_steps=it.boost_steps)
        except ValueError as exc:
            return str(exc) or "refused"
        return ""

    # ----- helpers ----------------------------------------------------------
    def _remember_arrivals(self, request_id: str, times: tuple[float, ...]) -> None:
        self._arrivals[request_id] = times
        while len(self._arrivals) > 1024:
            self._arrivals.pop(next(iter(self._arrivals)))

    def _drop(self, e: LLMEngine, request_id: str) -> bool:
        self._leases.pop(request_id, None)
        self._dispatch.pop(request_id, None)
        self.receiver.cancel(request_id)
        return e.abort(request_id)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        events = [TokenEvent(o.request_id, o.new_token_ids, o.new_text,
                             o.finish_reason.value if o.finish_reason else None) for o in outputs]
        first = self._events.put(events)
        if self._publisher is not None:
            self._step_events = (first, events)  # published with the load, in _after_step

    def _after_step(self) -> None:
        self._expire_leases()
        self._load_at = time.time()
        self._load_snapshot = self._load(self.engine)
        if self._publisher is not None:
            self._publish()

    def _publish(self) -> None:
        """This step's events and (if it changed) the load, as one message.
        A lost message loses nothing: the events stay in the mailbox, where
        the controller fetches what its channel missed."""
        step, self._step_events = self._step_events, None
        load = self._load_snapshot
        changed = load != self._published_load
        if step is None and not changed:
            return
        first, events = step if step is not None else (self._events.end(), [])
        payload = encode_batch(first, events, load if changed else None, self._load_at)
        if self._publisher.publish(payload) and changed:
            self._published_load = load

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for rid in [r for r, deadline in self._leases.items() if deadline < now]:
            self._drop(self.engine, rid)

    def _load(self, e: LLMEngine) -> WorkerLoad:
        queued = sum(s.num_uncomputed for s in e.waiting)
        return self.spec.load(queued, len(e.running) + len(e.waiting), e.blocks)


def _event_publisher(spec: WorkerSpec) -> Publisher | None:
    """Publishes this incarnation's events to Redis, if the worker has Redis
    (a channel per incarnation: a restarted worker numbers from 0 again)."""
    if spec.redis_url is None:
        return None
    from cluster.state import password_from_env

    channel = events_channel(spec.namespace, spec.worker_id, uuid.uuid4().hex[:12])
    return Publisher(spec.redis_url, password_from_env(spec.redis_password_env), channel)
