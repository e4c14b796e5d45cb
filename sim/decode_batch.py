"""The decoding sequences of one simulated worker, kept as aggregates: a run of
decode steps costs O(1) to plan and each sequence O(log n) to finish.

Lifecycle of a member::

    join(seq, tracker, steps_done, table_blocks)
        a running sequence that decodes one token in every step of its worker
        from now on (nothing waits to be admitted, the KV cache has room)
    ... the worker's step counter advances; no member is touched ...
    pop_finished(step)   its last token was sampled in that step
    clear()              the batch planner takes over again; the worker writes
                         each member's progress back (``computed``, ``outputs``)

Why aggregates are exact: while every member decodes one token per step,
worker step ``s`` computes token ``y_i + s - 1`` of member i (``y_i`` = its
computed tokens at join minus the worker's steps then), so in step ``s``:

    KV length of the batch (new tokens included)   sum(y_i) + n * s
    KV blocks the members hold                     sum_i ceil((y_i + s) / block_size)

the second from the counts of ``y_i mod block_size`` in O(block_size). The
latency model is linear in the batch's KV length at fixed n, so step times
follow in closed form (``DecodeWindow``).
"""

from __future__ import annotations

import bisect
import heapq
import math

from sim.tracker import Tracker
from workers.sequence import Sequence

_INF = float("inf")


class Member:
    __slots__ = ("seq", "tracker", "y", "joined_at", "outputs", "table_blocks", "finish_step",
                 "gaps_from")

    def __init__(self, seq: Sequence, tracker: Tracker, steps_done: int, table_blocks: int):
        self.seq, self.tracker = seq, tracker
        self.y = seq.num_computed_tokens - steps_done  # computed tokens after step s: y + s
        self.joined_at = steps_done  # worker steps done when it joined
        self.outputs = len(seq.output_token_ids)  # output tokens at join
        self.table_blocks = table_blocks  # blocks in its own table; its growth is pooled
        left = max(1, tracker.req.output_tokens - self.outputs)  # a running sequence decodes once
        self.finish_step = steps_done + left  # the step that samples its last token
        # its first decode token's gap is counted when that step is scheduled; later
        # gaps are step durations, from the worker's record of its longest steps
        self.gaps_from = steps_done + 2

    def computed(self, steps_done: int) -> int:
        return self.y + steps_done

    def output_tokens(self, steps_done: int) -> int:
        return self.outputs + steps_done - self.joined_at


class DecodeBatch:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.members: dict[str, Member] = {}  # request id -> member
        self.joined: list[Member] = []  # members whose first step is not yet scheduled
        self.y_sum = 0  # sum of the members' y: their KV length in step s is y_sum + n s
        self._q_sum = 0  # sum of y_i // block_size
        # members by y mod block_size: step s adds phase[(1 - s) % block_size] blocks
        # (a DecodeWindow reads the list itself, while it is fixed)
        self.phase = [0] * block_size
        self._table_sum = 0
        self._finishes: list[tuple[int, float, int, Member]] = []  # (step, -priority, serial, m)
        self._serial = 0
        # ``growth`` last computed, kept up to date as members join and leave: later
        # steps are a few increments away
        self._g_step, self._g_blocks = -1, 0
        # the worker's longest steps, for token gaps: last step of each recorded run
        # and its longest step, kept decreasing (the max over steps >= s is the first
        # entry at or after s)
        self._gap_steps: list[int] = []
        self._gap_s: list[float] = []

    def __len__(self) -> int:
        return len(self.members)

    # ----- membership --------------------------------------------------------------
    def join(self, seq: Sequence, tracker: Tracker, steps_done: int, table_blocks: int) -> None:
        m = Member(seq, tracker, steps_done, table_blocks)
        self.members[seq.request_id] = m
        self.joined.append(m)
        self._add(m, 1)
        self._serial += 1  # the planner's order among equal priorities: running order
        heapq.heappush(self._finishes, (m.finish_step, -seq.priority, self._serial, m))

    def pop_finished(self, step: int) -> list[Member] | tuple[()]:
        """Members whose last token was sampled in ``step``, in the planner's order."""
        if self._finishes[0][0] != step:  # (the batch has members: the heap holds them)
            assert self._finishes[0][0] > step, "a member finished unseen"
            return ()
        done = []
        while self._finishes and self._finishes[0][0] == step:
            m = heapq.heappop(self._finishes)[3]
            del self.members[m.seq.request_id]
            self._add(m, -1)
            done.append(m)
        assert not self._finishes or self._finishes[0][0] > step, "a member finished unseen"
        return done

    def clear(self) -> None:
        self.__init__(self.block_size)

    def _add(self, m: Member, sign: int) -> None:
        bs = self.block_size
        q, r = divmod(m.y, bs)
        self.y_sum += sign * m.y
        self._q_sum += sign * q
        self.phase[r] += sign
        self._table_sum += sign * m.table_blocks
        if self._g_step >= 0:  # the member's own growth in that step
            self._g_blocks += sign * (-(-(m.y + self._g_step) // bs) - m.table_blocks)

    # ----- the batch in step s ---------------------------------------------------------
    def next_finish(self) -> int:
        return self._finishes[0][0]

    def window_start(self, first: int) -> tuple[int, int, int]:
        """What a window from step ``first`` needs: ``(next_finish(), growth(first),
        kv_tokens(first))``."""
        return self._finishes[0][0], self.growth(first), self.y_sum + len(self.members) * first

    def kv_tokens(self, step: int) -> int:
        """Total KV length of the members in ``step``, its new tokens included."""
        return self.y_sum + len(self.members) * step

    def kv_tokens_over(self, first: int, last: int) -> int:
        """``kv_tokens`` summed over steps ``first..last``."""
        m = last - first + 1
        return m * self.y_sum + len(self.members) * (first + last) * m // 2

    def growth(self, step: int) -> int:
        """KV blocks the members hold in ``step`` beyond their own tables at join."""
        bs, phase = self.block_size, self.phase
        last, blocks = self._g_step, self._g_blocks
        if 0 <= last <= step <= last + 4:
            # step s adds a block for each member whose y + s - 1 fills its last one
            for s in range(last + 1, step + 1):
                blocks += phase[(1 - s) % bs]
        else:
            n = len(self.members)
            q, r = divmod(step, bs)
            # ceil((y + s) / bs) = y // bs + q + (0, 1 or 2 by y % bs + r)
            blocks = self._q_sum + n * q + n - self._table_sum
            if r == 0:
                blocks -= phase[0]
            else:
                blocks += sum(phase[bs - r + 1:])
        self._g_step, self._g_blocks = step, blocks
        return blocks

    def last_fitting_step(self, first: int, last: int, room: int) -> int:
        """The last step in ``first..last`` whose growth fits in ``room`` blocks
        (``first - 1`` if none): every ``block_size`` steps add one block per member."""
        if self.growth(first) > room:
            return first - 1
        n, bs = len(self.members), self.block_size
        s = min(last, first + bs * ((room - self.growth(first)) // n))
        while s < last and self.growth(s + 1) <= room:
            s += 1
        return s

    # ----- token gaps --------------------------------------------------------------------
    def record_steps(self, last_step: int, longest_s: float) -> None:
        """Steps up to ``last_step`` ran, the longest (the last of a run of equal
        batches: its KV is the longest) for ``longest_s``."""
        steps, vals = self._gap_steps, self._gap_s
        while vals and vals[-1] <= longest_s:
            steps.pop()
            vals.pop()
        steps.append(last_step)
        vals.append(longest_s)

    def longest_step_since(self, step: int) -> float:
        i = bisect.bisect_left(self._gap_steps, step)
        return self._gap_s[i] if i < len(self._gap_s) else 0.0


class DecodeWindow:
    """Steps ``first..last`` of a worker whose batch does not change: step
    ``first + j`` lasts ``first_s + growth_s * j`` (one more token of KV per
    member per step, and step time linear in the KV length).

    ``advance`` follows the step in progress as time moves on, with the
    members' KV growth in it (``DecodeBatch.growth``) when the window is
    given the batch's ``blocks_first`` and ``phase``."""

    __slots__ = ("start_s", "first", "last", "first_s", "growth_s", "_phase", "_bs", "_at",
                 "_at_from", "_at_end", "_to", "_to_end", "_blocks")

    def __init__(self, start_s: float, first: int, last: int, first_s: float, growth_s: float,
                 blocks_first: int = 0, phase: list[int] | None = None):
        self.start_s = start_s  # when step ``first`` starts
        self.first, self.last = first, last  # worker step numbers, inclusive
        self.first_s = first_s  # duration of step ``first``
        self.growth_s = growth_s  # each later step lasts this much longer
        # the batch's counts of y mod block_size (constant while the window runs):
        # step s takes phase[(1 - s) % block_size] new blocks
        self._phase = phase = phase or [0]
        self._bs = bs = len(phase)  # the block size
        # ``advance``'s cursor: the step it last found in progress and when that
        # step starts and ends (``step_at`` reads them too); the last step from it
        # on before one that takes a new block, when that one ends, and the
        # members' growth in all of them
        self._at, self._at_from, self._at_end = first, start_s, start_s + first_s
        self._blocks = blocks_first
        s = first
        while s < last and not phase[-s % bs]:  # step s + 1 takes no block
            s += 1
        self._to, self._to_end = s, self._at_end if s == first else self.end(s)

    def end(self, step: int) -> float:
        """When ``step`` ends (``start_s`` for ``first - 1``)."""
        m = step - self.first + 1
        return self.start_s + m * self.first_s + self.growth_s * (m * (m - 1) // 2)

    def duration(self, step: int) -> float:
        return self.first_s + self.growth_s * (step - self.first)

    def advance(self, t: float) -> tuple[float, int]:
        """``(until, blocks)``: the members' growth in the step in progress at
        ``t`` (``DecodeBatch.growth`` of ``step_at(t)``), and until when it holds:
        the end of the last step before the next one that takes a block (of the
        window's last step if none does). ``t`` is no earlier than at the
        previous call: the cursor moves forward, a step or two per call."""
        s, e, last = self._to, self._to_end, self.last
        if e > t and s <= last:
            return e, self._blocks
        blocks, phase, bs = self._blocks, self._phase, self._bs
        if s > last:  # cut behind the cursor
            while s > last:
                blocks -= phase[(1 - s) % bs]
                s -= 1
            e = self.end(s)
            self._at, self._at_from, self._at_end = s, _INF, e  # (not read by step_at)
        elif s < last:
            start, a, b, first = self.start_s, self.first_s, self.growth_s, self.first
            # by m = s - first + 1 (end(s) = start + m a + b m (m - 1) / 2), written
            # out: a view's hottest loop
            m = s - first + 1
            m_last, k, tri = m + last - s, (2 - first) % bs, m * (m - 1) // 2
            while True:  # to the step in progress
                tri += m
                m += 1
                blocks += phase[(k - m) % bs]  # phase[(1 - s) % bs]
                prev, e = e, start + m * a + b * tri
                if e > t or m == m_last:
                    break
            s = first + m - 1
            self._at, self._at_from, self._at_end = s, prev, e
            if s < last and not phase[-s % bs]:  # and past the steps that take no block
                s += 1
                while s < last and not phase[-s % bs]:
                    s += 1
                m = s - first + 1
                e = start + m * a + b * (m * (m - 1) // 2)
        self._to, self._to_end, self._blocks = s, e, blocks
        return e, blocks

    def step_at(self, t: float, before_step_done: bool = False) -> int:
        """The step in progress at ``t``. A step ending exactly at ``t`` is done,
        except for events that sort before STEP_DONE (``before_step_done``)."""
        if self._at_from < t < self._at_end and self._at <= self.last:
            return self._at  # strictly inside the cursor's step (a view was just taken)
        total = self.last - self.first + 1
        start, a, b = self.start_s, self.first_s, self.growth_s
        # u steps end at start + a u + b u (u - 1) / 2: solve for u, then settle the
        # rounding against ``end`` itself
        dt, lin = t - start, a - b / 2
        u = int(2 * dt / (lin + math.sqrt(lin * lin + 2 * b * dt))) if dt > 0 else 0
        if u > total:
            u = total
        while u < total:
            e = start + (u + 1) * a + b * ((u + 1) * u // 2)  # end(first + u)
            if e < t or (e == t and not before_step_done):
                u += 1
            else:
                break
        while u > 0:
            e = start + u * a + b * (u * (u - 1) // 2)  # end(first + u - 1)
            if e < t or (e == t and not before_step_done):
                break
            u -= 1
        return self.first + u if u < total else self.last
