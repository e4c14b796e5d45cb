"""``PrefillWorker``: a Ray actor that prefills prompts and streams their KV
to decode workers, layer by layer.

Lifecycle of a job::

    prefill(job) -> the engine thread queues the request (export_kv) ->
    its last prefill chunk runs: after each layer, that layer's blocks are
    gathered into a buffer and handed to the KV sender (bytes move while the
    next layers compute) -> the token after the prompt is sampled and the
    engine frees the blocks -> the sender waits for the decode side's verdict
    (one retry) -> PrefillResult.

The controller submits a scheduling round's jobs in one ``submit_prefills``
call and follows ``stream_results`` (a Ray streaming generator: one item per
batch of finished results; ``next_results`` is the same as a long-poll).
``prefill(job)`` is the one-job form that awaits its own result.

The actor is a plain class; the launcher wraps it with ``ray.remote`` and
places it on a node of its pool's GPU type.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from kernels import gather_kv_blocks
from kvtransfer import make_sender
from kvtransfer.base import SendHandle, TransferMetrics
from workers.engine import LLMEngine, RequestOutput
from workers.engine_loop import EngineLoop
from workers.mailbox import Mailbox
from workers.messages import PrefillJob, PrefillResult, WorkerLoad
from workers.worker_config import WorkerSpec, build_engine, model_info, start_heartbeat


@dataclass
class _Job:
    job: PrefillJob
    submitted_s: float
    result: Future = field(default_factory=Future)
    handle: SendHandle | None = None
    started_s: float | None = None  # its first prefill chunk ran (perf_counter)


class PrefillWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.engine: LLMEngine = build_engine(spec)
        self.sender = make_sender(spec.transport, spec.device)
        self.metrics = TransferMetrics(spec.transport)
        self.engine.on_prefill_layer = self._export_layer
        self._jobs: dict[str, _Job] = {}
        self._finisher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-finish")
        self.layer_done_s: dict[str, list[float]] = {}  # request -> when each layer computed
        self._results: Mailbox[PrefillResult] = Mailbox()  # of jobs from submit_prefills
        self.heartbeat = start_heartbeat(spec)
        self._load_snapshot = self._load(self.engine)  # refreshed after every engine step
        self.loop = EngineLoop(self.engine, self._on_outputs, self._after_step)

    # ----- actor methods --------------------------------------------------
    async def prefill(self, job: PrefillJob) -> PrefillResult:
        state = _Job(job, time.perf_counter())
        error = (await self.loop.call(lambda e: self._add_jobs(e, [state])))[0]
        if error:
            raise ValueError(error)
        return await asyncio.wrap_future(state.result)

    async def submit_prefills(self, jobs: list[PrefillJob]) -> list[str]:
        """Queue several jobs in one engine-thread command; per job "" or why
        it was refused. Results come back through ``next_results``."""
        now = time.perf_counter()
        states = [_Job(job, now) for job in jobs]
        for state in states:
            state.result.add_done_callback(lambda f: self._results.put([f.result()]))
        return await self.loop.call(lambda e: self._add_jobs(e, states))

    async def next_results(self, cursor: int, timeout_s: float = 1.0
                           ) -> tuple[list[PrefillResult], int, WorkerLoad]:
        """Results of submitted jobs after ``cursor`` (waits up to ``timeout_s``
        for one), the new cursor, and this worker's load."""
        results, end = await self._results.since(cursor, timeout_s)
        return results, end, self._load_snapshot

    async def stream_results(self, cursor: int, idle_s: float = 1.0):
        """Async generator, called with ``num_returns="streaming"``: for each
        batch of results after ``cursor`` (or after ``idle_s`` without one, an
        empty batch) yields (results, the cursor after them, this worker's load)."""
        async for results, end in self._results.follow(cursor, idle_s):
            yield results, end, self._load_snapshot

    async def abort(self, request_id: str) -> bool:
        state = self._jobs.pop(request_id, None)
        if state is None:
            return False
        await self.loop.call(lambda e: e.abort(request_id))
        if not state.result.done():
            state.result.set_result(_aborted(request_id, state.job.generation))
        return True

    async def load(self) -> WorkerLoad:
        return await self.loop.call(self._load)

    async def free_blocks(self) -> int:
        return await self.loop.call(lambda e: e.blocks.num_free_blocks)

    async def transfer_metrics(self) -> TransferMetrics:
        return self.metrics

    async def inject_transfer_fault(self, corrupt_sends: int) -> None:
        """Test hook: corrupt one block in each of the next N layer sends."""
        self.sender.faults.corrupt_sends = corrupt_sends

    async def layer_timeline(self, request_id: str) -> list[float]:
        return self.layer_done_s.get(request_id, [])

    async def ping(self) -> str:
        return self.spec.worker_id

    async def node_id(self) -> str:
        """The Ray node this worker was placed on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def model_info(self) -> dict:
        return model_info(self.engine)

    # ----- engine thread --------------------------------------------------
    def _add_jobs(self, e: LLMEngine, states: list[_Job]) -> list[str]:
        errors = []
        for state in states:
            job = state.job
            self._drop_stale(e, job.request_id)
            self._jobs[job.request_id] = state
            params = replace(job.params, max_tokens=len(job.output_token_ids) + 1)
            try:
                e.add_request(job.request_id, job.prompt_token_ids, params,
                              output_token_ids=job.output_token_ids, export_kv=True,
                              handoff=len(job.output_token_ids) + 1 < job.params.max_tokens)
                errors.append("")
            except ValueError as exc:
                self._jobs.pop(job.request_id, None)
                errors.append(str(exc) or "refused")
        self._load_snapshot = self._load(e)
        return errors

    def _export_layer(self, layer: int, exports: list[tuple[str, list[int]]]) -> None:
        k_cache, v_cache = self.engine.kv_cache.layers[layer]
        for request_id, block_table in exports:
            state = self._jobs.get(request_id)
            if state is None:
                continue
            if state.handle is None:
                state.started_s = self.engine.sequence(request_id).first_scheduled_s
                state.handle = self.sender.open(request_id, state.job.kv_endpoint,
                                                self.engine.model_config.num_layers)
            blocks = torch.tensor(block_table, dtype=torch.int64, device=k_cache.device)
            state.handle.send_layer(layer, gather_kv_blocks(k_cache, v_cache, blocks))
            self.layer_done_s.setdefault(request_id, []).append(time.time())

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            state = self._jobs.pop(out.request_id, None)
            if state is not None:
                self._finisher.submit(self._finish, state, out, time.perf_counter())

    def _finish(self, state: _Job, out: RequestOutput, done_s: float) -> None:
        started_s = state.started_s or state.submitted_s
        result = state.handle.finish() if state.handle else None
        if result is not None:
            self.metrics.record(result)
        job = state.job
        reason = _finish_reason(out, job)
        state.result.set_result(PrefillResult(
            request_id=job.request_id, token_id=out.new_token_ids[0], text=out.new_text,
            finish_reason=reason, transfer_ok=bool(result and result.ok),
            transfer_attempts=result.attempts if result else 0,
            kv_bytes=result.bytes_sent if result else 0,
            transfer_s=result.seconds if result else 0.0,
            queue_s=max(0.0, started_s - state.submitted_s), prefill_s=done_s - started_s,
            error=result.error if result else "no KV was exported", generation=job.generation))

    def _drop_stale(self, e: LLMEngine, request_id: str) -> None:
        """A job for an id this worker still holds: the old one belongs to an
        older dispatch (e.g. a late call of a replaced controller) and goes."""
        old = self._jobs.pop(request_id, None)
        if old is not None:
            e.abort(request_id)
            if not old.result.done():
                old.result.set_result(_aborted(request_id, old.job.generation))

    def _after_step(self) -> None:
        self._load_snapshot = self._load(self.engine)

    def _load(self, engine: LLMEngine) -> WorkerLoad:
        queued = sum(s.num_uncomputed for s in list(engine.waiting) + engine.running)
        return self.spec.load(queued, len(engine.running), engine.blocks)


def _finish_reason(out: RequestOutput, job: PrefillJob) -> str | None:
    """The engine stopped after one token by construction; the request really
    ends only on a stop condition or when its own max_tokens is reached."""
    if out.finish_reason is not None and out.finish_reason.value == "stop":
        return "stop"
    if len(job.output_token_ids) + 1 >= job.params.max_tokens:
        return "length"
    return None


def _aborted(request_id: str, generation: int) -> PrefillResult:
    return PrefillResult(request_id, None, "", "abort", False, 0, 0, 0.0, 0.0, 0.0,
                         aborted=True, generation=generation)
