"""Which sequences run in the next engine step, and how many tokens each.

Pure Python (no torch): the simulator's workers batch with this very planner.

Lifecycle of one ``plan`` call:

1. running sequences, in priority order (boosted first, then higher
   ``priority``, then admission order: a stable sort, so equal priorities
   keep admission order): a decode needs 1 token, a partly prefilled
   sequence its next chunk; when the KV cache cannot grow, the
   lowest-ranked running sequence (the last one) is preempted — its blocks
   freed, its progress reset so it re-prefills prompt + output later (the
   same tokens: sampling is seeded per position);
2. waiting sequences, in queue order, are admitted while the token budget,
   ``max_num_seqs`` and the KV cache allow (prefix blocks reused), each with
   its first chunk of at most ``prefill_chunk_size`` tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.block_manager import BlockManager
from workers.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class BatchConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens computed per step
    prefill_chunk_size: int = 512  # tokens of one prompt per step at most

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    num_tokens: int  # computed this step, from seq.num_computed_tokens

    def __init__(self, seq: Sequence, num_tokens: int):
        # frozen: written once, here, as a whole new __dict__ (the generated __init__
        # sets each field through object.__setattr__: 3x the cost, once per chunk)
        object.__setattr__(self, "__dict__", {"seq": seq, "num_tokens": num_tokens})


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)  # work of this step
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def rank_key(seq: Sequence) -> tuple[bool, float]:
    """Sort key of running sequences: best-ranked first, preemption victim last."""
    return (seq.boost_steps <= 0, -seq.priority)


class BatchPlanner:
    def __init__(self, config: BatchConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks

    def plan(self, waiting: deque[Sequence], running: list[Sequence]) -> StepPlan:
        plan = StepPlan()
        running.sort(key=rank_key)
        budget = self._plan_running(running, waiting, plan)
        self._admit(waiting, running, plan, budget)
        for c in plan.chunks:
            if c.seq.boost_steps > 0:
                c.seq.boost_steps -= 1
        return plan

    def plan_admissions(self, waiting: deque[Sequence], running: list[Sequence],
                        budget: int) -> StepPlan:
        """Step 2 of ``plan`` alone, for a caller that knows step 1's outcome: every
        running sequence decodes one token, its KV blocks already appended, and
        ``budget`` tokens are left (the simulator's fast-forwarded decode batch).
        The plan holds the admitted sequences' chunks only."""
        plan = StepPlan()
        self._admit(waiting, running, plan, budget)
        for c in plan.chunks:
            if c.seq.boost_steps > 0:
                c.seq.boost_steps -= 1
        return plan

    def _plan_running(self, running, waiting, plan: StepPlan) -> int:
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_uncomputed, self.config.prefill_chunk_size, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n, running, waiting, plan):
                break  # seq itself was preempted: it was the last one
            plan.chunks.append(Chunk(seq, n))
            budget -= n
            i += 1
        return budget

    def _make_room(self, seq, num_tokens, running, waiting, plan) -> bool:
        """Grow ``seq`` to ``num_tokens``, preempting from the back if needed."""
        while not self.blocks.append(seq.request_id, num_tokens):
            victim = running.pop()
            self.preempt(victim, waiting)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence, waiting: deque[Sequence]) -> None:
        self.blocks.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        waiting.appendleft(seq)

    def _admit(self, waiting, running, plan: StepPlan, budget: int) -> None:
        if plan.preempted:
            return  # memory is short: no admissions this step
        blocks, caching = self.blocks, self.blocks.enable_prefix_caching
        while waiting and budget > 0 and len(running) < self.config.max_num_seqs:
            seq = waiting[0]
            num_tokens = seq.num_tokens
            if caching:
                alloc = blocks.allocate(seq.request_id, seq.token_ids)
                if alloc is None:
                    break
                cached = alloc.num_cached_tokens
            elif blocks.allocate_fresh(seq.request_id, num_tokens):
                cached = 0  # only the number of tokens matters: no copy of their ids
            else:
                break
            waiting.popleft()
            seq.num_computed_tokens = cached
            seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            n = min(num_tokens - cached, self.config.prefill_chunk_size, budget)  # uncomputed
            plan.chunks.append(Chunk(seq, n))
            budget -= n
