"""Per-request state inside one engine. Pure Python.

Lifecycle::

    WAITING --admitted (blocks allocated)--> RUNNING --stop/length/abort--> FINISHED
       ^                                        |
       +------ preempted (blocks freed) --------+

Priority: under KV pressure the batch planner preempts the running
sequence with the lowest ``(boost_steps > 0, priority)``, the latest
admitted among equals; all-default priorities give plain arrival order.

A step computes tokens ``[num_computed_tokens, num_computed_tokens + n)`` of
``token_ids``. When a step reaches the end of ``token_ids`` the engine samples
the next token, so prefill chunks, decodes and re-prefill after preemption are
one mechanism.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from workers.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled, deadline, or failed


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order tie-breaker
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    first_scheduled_s: float | None = None  # perf_counter time its first chunk ran
    priority: float = 0.0  # higher = preempted later when KV runs short (the ranker's score)
    boost_steps: int = 0  # steps left in which it outranks unboosted sequences (starvation quantum)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``token_ids[start:stop]`` without building the whole list (a decode
        step reads one token per sequence)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:stop - n]
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """One token left to compute and some KV already cached."""
        return self.num_uncomputed == 1 and self.num_computed_tokens > 0
