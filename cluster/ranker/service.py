"""The ranker inside the controller: score on arrival, learn on finish, hot swap.

Lifecycle (one ``RankerService`` per controller, built at start-up when the
scheduler policy is ``ltr`` or completion logging is on)::

    on_arrival(rid, prompt ids)  decode the ids to text, queue the prompt; the
                                 first waiter starts a batch that takes every
                                 prompt queued by then (at most ``max_batch``),
                                 sorts it by length and runs the encoder on
                                 chunks of ``chunk`` prompts in a thread (never
                                 on the event loop), shortest first, each
                                 chunk's scores released as soon as it is done;
                                 prompts arriving meanwhile form the next batch
                                 -> the score (None if the ranker failed: the
                                 request is still served, ranked last)
    on_finish(rid, n, reason)    the online tau gauge gets (score, n); the
                                 completion log (opt-in) gets a record (after
                                 scoring, if the request finished first)
    swap(path)                   a retrained head replaces the current one
                                 between two batches (see ``Ranker.swap_head``)

``stats`` counts prompts, batches and the encoder's busy (wall) and CPU
seconds, so the overhead of ranking can be set against end-to-end latency.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster.ranker.ranker import Ranker
from cluster.ranker.traffic import CompletionLog, OnlineTau

log = logging.getLogger("baton.ranker")


@dataclass
class RankerStats:
    prompts: int = 0  # prompts scored
    batches: int = 0  # encoder calls
    busy_s: float = 0.0  # wall seconds inside encoder + head calls
    cpu_s: float = 0.0  # CPU seconds of those calls (wall seconds with several torch threads)
    largest_batch: int = 0
    failures: int = 0  # batches that raised (their requests got no score)


@dataclass
class _Arrival:
    text: str
    future: asyncio.Future
    score: float | None = None
    features: object = None  # torch (385,) tensor, kept only for the completion log
    outcome: tuple[int, str] | None = None  # (output tokens, finish reason) once finished


@dataclass
class RankerService:
    ranker: Ranker
    decode: Callable[[list[int]], str]  # serving-model token ids -> prompt text
    completions: CompletionLog | None = None
    tau: OnlineTau = field(default_factory=OnlineTau)
    max_batch: int = 64  # prompts taken from the queue at once
    chunk: int = 16  # prompts per encoder call: scores come back every chunk, not every batch
    stats: RankerStats = field(default_factory=RankerStats)
    _queue: list[str] = field(default_factory=list, init=False)  # ids waiting for a batch
    _arrivals: dict[str, _Arrival] = field(default_factory=dict, init=False)  # until learned from
    _batcher: asyncio.Task | None = field(default=None, init=False)  # the running batch loop

    async def on_arrival(self, request_id: str, prompt_ids: list[int]) -> float | None:
        fut = asyncio.get_running_loop().create_future()
        self._arrivals[request_id] = _Arrival(self.decode(prompt_ids), fut)
        self._queue.append(request_id)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._run_batches())
        return await fut

    async def _run_batches(self) -> None:
        await asyncio.sleep(0)  # arrivals of this same moment join the first batch
        while self._queue:
            ids, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            batch = sorted(((rid, self._arrivals[rid]) for rid in ids), key=lambda b: len(b[1].text))
            for s in range(0, len(batch), self.chunk):  # similar lengths share a chunk: little padding
                await self._score_batch(batch[s:s + self.chunk])

    async def _score_batch(self, batch: list[tuple[str, _Arrival]]) -> None:
        t0 = time.perf_counter()
        keep = self.completions is not None and self.completions.store == "features"
        try:
            scores, feats, cpu = await asyncio.to_thread(self._score_texts,
                                                         [a.text for _, a in batch])
            self.stats.cpu_s += cpu
        except Exception:  # noqa: BLE001 - ranking is advisory: serve unranked
            log.exception("ranker failed on a batch of %d prompts", len(batch))
            self.stats.failures += 1
            scores, feats = [None] * len(batch), [None] * len(batch)
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.prompts += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for (rid, a), s, x in zip(batch, scores, feats, strict=True):
            a.score, a.features = s, (x if keep else None)
            if not a.future.done():
                a.future.set_result(s)
            if a.outcome is not None:  # finished before its score was ready
                await self._complete(rid)

    def _score_texts(self, texts: list[str]):
        """Scores, features and the CPU seconds they took. Wall time on shared cores
        also counts waiting for a core; this thread's CPU time does not. With more
        than one torch thread the other threads' share is not seen: wall time then."""
        import torch

        one = torch.get_num_threads() == 1
        c0, w0 = time.thread_time(), time.perf_counter()
        scores, x = self.ranker.score_and_features(texts)
        cpu = time.thread_time() - c0 if one else time.perf_counter() - w0
        return scores, list(x), cpu

    async def on_finish(self, request_id: str, output_tokens: int, reason: str) -> None:
        """Learn from a finished request now, or as soon as its score is ready
        (a short request can finish before its batch is scored)."""
        a = self._arrivals.get(request_id)
        if a is None:
            return
        a.outcome = (output_tokens, reason)
        if a.future.done():
            await self._complete(request_id)

    async def _complete(self, request_id: str) -> None:
        a = self._arrivals.pop(request_id)
        output_tokens, reason = a.outcome
        if a.score is None or reason == "abort":
            return
        self.tau.add(a.score, output_tokens)
        if self.completions is not None:
            try:
                await self.completions.record(a.text, output_tokens, a.score, a.features)
            except Exception as exc:  # noqa: BLE001 - logging must never fail a request
                log.warning("completion log write failed: %s", type(exc).__name__)

    @classmethod
    def build(cls, config, redis) -> RankerService:
        """From a ``ClusterConfig``: its head, its serving tokenizer (to turn
        prompt ids back into text) and, if opted in, its completion log."""
        import torch

        from workers.loader import load_tokenizer

        spec = config.ranker
        torch.set_num_threads(spec.num_threads)  # process-wide: the controller runs no other torch
        tokenizer = load_tokenizer(config.model.source)
        log_ = (CompletionLog(redis, config.redis.namespace, spec.log_prompts, spec.log_cap)
                if spec.log_completions else None)
        return cls(Ranker.load(spec.head_path, spec.precision), tokenizer.decode, log_,
                   OnlineTau(spec.tau_window), spec.max_batch, chunk=spec.chunk)

    def swap(self, head: str | bytes) -> dict:
        """A head file's path, or its bytes (from a CLI on another machine)."""
        if isinstance(head, str):
            return self.ranker.swap_head(head)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "head.safetensors"
            path.write_bytes(head)
            info = self.ranker.swap_head(path)
        return {**info, "head_path": f"<{len(head)} bytes>"}

    def report(self) -> dict:
        s = self.stats
        return {"head_path": self.ranker.head_path, "precision": self.ranker.precision,
                "prompts": s.prompts, "batches": s.batches,
                "busy_s": s.busy_s, "cpu_s": s.cpu_s, "largest_batch": s.largest_batch,
                "failures": s.failures,
                "online_tau": self.tau.value}
