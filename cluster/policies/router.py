"""Routing policies: which prefill and which decode worker serve a request.

Lifecycle: for the request at the front of the scheduler's order, the
controller (or simulator) calls ``route(request, prefill, decode, prefix_hits)``
with the live workers of each role (a mixed pool's workers as both lists).
``None`` means no worker has room now: the request keeps waiting. For a mixed
pool ``route`` asks ``pick_mixed`` (``pick`` among the workers with room for
both phases; ``LeastLoaded`` does both in one pass: it runs for every
dispatched request over every worker).

Room: a prefill worker takes a prompt while its queue stays under two steps of
its token budget (or is empty); a decode worker needs free KV blocks for the
prompt plus the generation cap and a free batch slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

from cluster.policies.types import RequestView, Route, WorkerView


def prefill_fits(w: WorkerView, r: RequestView) -> bool:
    return w.alive and (w.queued_prefill_tokens == 0 or r.prompt_tokens <= w.prefill_room())


def decode_fits(w: WorkerView, r: RequestView) -> bool:
    blocks = w.kv_blocks_for(r.prompt_tokens + r.max_tokens)
    return w.alive and blocks <= w.free_kv_blocks and w.running < w.max_num_seqs


class RouterPolicy(ABC):
    name: ClassVar[str]

    def route(self, request: RequestView, prefill: Sequence[WorkerView],
              decode: Sequence[WorkerView],
              prefix_hits: Mapping[str, int] | None = None) -> Route | None:
        # ``prefill_fits`` and ``decode_fits`` written out: a route runs for every
        # dispatched request over every worker (the simulator's hot path)
        prompt, total = request.prompt_tokens, request.prompt_tokens + request.max_tokens
        hits = prefix_hits or {}
        for w in decode:
            if w.role != "mixed":
                break
        else:  # colocated: one worker does both
            w = self.pick_mixed(request, decode, hits)
            return Route(w.worker_id, w.worker_id) if w else None
        p = self.pick(request, [
            w for w in prefill if w.alive and (
                w.queued_prefill_tokens == 0
                or prompt <= 2 * w.max_num_batched_tokens - w.queued_prefill_tokens)],
            hits, "prefill")
        d = self.pick(request, [
            w for w in decode if w.alive and w.running < w.max_num_seqs
            and total <= w.free_kv_blocks * w.block_size], hits, "decode")
        return Route(p.worker_id, d.worker_id) if p and d else None

    def pick_mixed(self, request: RequestView, workers: Sequence[WorkerView],
                   prefix_hits: Mapping[str, int]) -> WorkerView | None:
        """The mixed worker for ``request``: ``pick`` among those with room for its
        prompt and for its KV (``prefill_fits`` and ``decode_fits``, written out)."""
        prompt, total = request.prompt_tokens, request.prompt_tokens + request.max_tokens
        return self.pick(request, [
            w for w in workers if w.alive and w.running < w.max_num_seqs
            and total <= w.free_kv_blocks * w.block_size  # kv_blocks_for(total) fit
            and (w.queued_prefill_tokens == 0
                 or prompt <= 2 * w.max_num_batched_tokens - w.queued_prefill_tokens)],
            prefix_hits, "prefill")

    @abstractmethod
    def pick(self, request: RequestView, candidates: list[WorkerView],
             prefix_hits: Mapping[str, int], role: str) -> WorkerView | None:
        """One of ``candidates`` (all have room), or None if empty."""


class RoundRobin(RouterPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}  # role -> rotation counter

    def pick(self, request, candidates, prefix_hits, role):
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        i = self._next.get(role, 0)
        self._next[role] = i + 1
        return ordered[i % len(ordered)]


class LeastLoaded(RouterPolicy):
    """Prefill: fewest queued prompt tokens. Decode: most free KV blocks."""

    name = "least-loaded"

    def pick_mixed(self, request, workers, prefix_hits):
        # ``pick`` of the fitting workers with their load keys from the same pass
        # (the index i: the first of equal keys, as ``min`` picks)
        prompt, total = request.prompt_tokens, request.prompt_tokens + request.max_tokens
        keys = [(q, r, w.worker_id, i) for i, w in enumerate(workers)
                if w.alive and (r := w.running) < w.max_num_seqs
                and total <= w.free_kv_blocks * w.block_size
                and ((q := w.queued_prefill_tokens) == 0
                     or prompt <= 2 * w.max_num_batched_tokens - q)]
        return workers[min(keys)[3]] if keys else None

    def pick(self, request, candidates, prefix_hits, role):
        if not candidates:
            return None
        if role == "prefill":
            # min(candidates, key=(queued, running, id)) with the keys from one list
            # comprehension (a key function's attribute reads take the slow path)
            keys = [(w.queued_prefill_tokens, w.running, w.worker_id) for w in candidates]
            return candidates[keys.index(min(keys))]
        return max(candidates, key=lambda w: (w.free_kv_blocks, -w.running, w.worker_id))


class PrefixAware(LeastLoaded):
    """Prefill on the worker holding the longest cached prefix of the prompt
    (from the prefix-block index); ties and misses fall back to least loaded."""

    name = "prefix-aware"
    pick_mixed = RouterPolicy.pick_mixed  # through its own ``pick``

    def pick(self, request, candidates, prefix_hits, role):
        if role != "prefill" or not candidates:
            return super().pick(request, candidates, prefix_hits, role)
        best = max(prefix_hits.get(w.worker_id, 0) for w in candidates)
        if best == 0:
            return super().pick(request, candidates, prefix_hits, role)
        return super().pick(request, [w for w in candidates
                                      if prefix_hits.get(w.worker_id, 0) == best], prefix_hits, role)
