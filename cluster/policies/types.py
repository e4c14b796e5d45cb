"""Snapshots in, decisions out: the boundary between mechanism and policy.

The controller (real workers, wall-clock time) and the simulator (simulated
workers, simulated time) both fill these dataclasses and read the decisions.

The snapshots are frozen. ``RequestView``, ``WorkerView`` and ``Route`` write
their ``__init__`` out: the one ``dataclass`` generates for a frozen class sets
each field through ``object.__setattr__`` and costs three times as much,
and the simulator builds a view for every request and for every worker
whose load changed, millions per run. Field order, defaults, equality,
hashing, ``repr`` and ``dataclasses.replace`` are the dataclass's own.

They hand the instance its fields as a whole new ``__dict__``: writing them
into ``self.__dict__`` one by one instead leaves an instance whose every
attribute read takes CPython's slow path (2.5x; the router reads several
fields of every worker's view per request).
"""

from __future__ import annotations

from dataclasses import dataclass

_new = object.__new__
_setattr = object.__setattr__  # past the frozen class's own __setattr__


@dataclass(frozen=True)
class RequestView:
    """A request waiting at the controller, as a policy sees it."""

    request_id: str
    prompt_tokens: int  # length of the prompt in tokens
    max_tokens: int  # generation cap
    arrival_s: float  # when it reached the controller (controller's clock)
    waited_rounds: int = 0  # scheduling rounds it has been passed over
    score: float | None = None  # ranker score: higher = shorter expected output
    true_output_tokens: int | None = None  # known only to oracles (sim, benchmarks)
    prefix_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full KV blocks

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int, arrival_s: float,
                 waited_rounds: int = 0, score: float | None = None,
                 true_output_tokens: int | None = None, prefix_hashes: tuple[int, ...] = ()):
        _setattr(self, "__dict__", {  # frozen: fields are written once, here
            "request_id": request_id, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "arrival_s": arrival_s, "waited_rounds": waited_rounds, "score": score,
            "true_output_tokens": true_output_tokens, "prefix_hashes": prefix_hashes})

    def with_score(self, score: float | None) -> RequestView:
        """This view with the ranker's score (it may come after the request joined)."""
        return self._replaced("score", score)

    def with_waited_rounds(self, waited_rounds: int) -> RequestView:
        """This view passed over ``waited_rounds`` times (a waiting request gets
        a new view at every round that passes it over)."""
        return self._replaced("waited_rounds", waited_rounds)

    def _replaced(self, name: str, value) -> RequestView:
        """``dataclasses.replace`` of one field at a fifth of its cost."""
        fields = self.__dict__.copy()
        fields[name] = value
        v = _new(type(self))
        _setattr(v, "__dict__", fields)
        return v


@dataclass(frozen=True)
class WorkerView:
    """A worker's load, as last reported."""

    worker_id: str
    role: str  # prefill | decode | mixed
    gpu_type: str
    queued_prefill_tokens: int  # prompt tokens dispatched but not yet prefilled
    running: int  # requests in its decode batch
    free_kv_blocks: int
    total_kv_blocks: int
    block_size: int  # tokens per KV block
    max_num_batched_tokens: int  # its prefill token budget per step
    max_num_seqs: int  # its decode batch cap
    alive: bool = True

    def __init__(self, worker_id: str, role: str, gpu_type: str, queued_prefill_tokens: int,
                 running: int, free_kv_blocks: int, total_kv_blocks: int, block_size: int,
                 max_num_batched_tokens: int, max_num_seqs: int, alive: bool = True):
        _setattr(self, "__dict__", {  # frozen: fields are written once, here
            "worker_id": worker_id, "role": role, "gpu_type": gpu_type,
            "queued_prefill_tokens": queued_prefill_tokens, "running": running,
            "free_kv_blocks": free_kv_blocks, "total_kv_blocks": total_kv_blocks,
            "block_size": block_size, "max_num_batched_tokens": max_num_batched_tokens,
            "max_num_seqs": max_num_seqs, "alive": alive})

    def with_load(self, queued_prefill_tokens: int, running: int,
                  free_kv_blocks: int) -> WorkerView:
        """This view with another load: ``dataclasses.replace`` of those three
        fields at a third of its cost (the simulator refreshes its workers'
        views several times per request)."""
        fields = self.__dict__.copy()
        fields["queued_prefill_tokens"] = queued_prefill_tokens
        fields["running"] = running
        fields["free_kv_blocks"] = free_kv_blocks
        v = _new(type(self))
        _setattr(v, "__dict__", fields)
        return v

    def prefill_room(self) -> int:
        """Prompt tokens it can take before its queue exceeds two steps of work."""
        return 2 * self.max_num_batched_tokens - self.queued_prefill_tokens

    def kv_blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass(frozen=True)
class SchedulingRound:
    """What the scheduler sees at one dispatch opportunity."""

    now_s: float
    round_index: int  # increases by one per round
    waiting: tuple[RequestView, ...]


@dataclass(frozen=True)
class Route:
    """Where a request runs: its prefill worker and its decode worker
    (the same worker for a mixed pool)."""

    prefill_worker: str
    decode_worker: str

    def __init__(self, prefill_worker: str, decode_worker: str):
        # frozen: written once, here (one per dispatched request)
        _setattr(self, "__dict__", {"prefill_worker": prefill_worker,
                                    "decode_worker": decode_worker})


@dataclass(frozen=True)
class AdmissionDecision:
    accepted: bool
    reason: str = ""  # why it was refused, for the client's error
