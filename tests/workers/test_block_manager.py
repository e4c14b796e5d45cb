"""Block manager: exact block ids, prefix reuse, eviction order, OOM as a value;
and random operation sequences against the previous implementation."""

import random

import pytest

from workers.block_manager import Allocation, BlockManager, block_hashes


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_allocate_hands_out_lowest_free_blocks_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", toks(0, 9)) == Allocation((0, 1, 2), 0)
    assert bm.allocate("b", toks(100, 4)) == Allocation((3,), 0)
    assert bm.num_free_blocks == 4


def test_out_of_memory_is_none_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", toks(0, 8))
    assert bm.can_allocate(toks(50, 8)) is False
    assert bm.allocate("b", toks(50, 8)) is None
    assert bm.num_free_blocks == 1 and not bm.has("b")
    assert bm.append("a", 13) is False  # needs 2 more blocks, 1 free
    assert bm.block_table("a") == [0, 1]


def test_append_grows_table_only_at_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(0, 3))
    assert bm.append("a", 4) and bm.block_table("a") == [0]
    assert bm.append("a", 5) and bm.block_table("a") == [0, 1]
    assert bm.append("a", 12) and bm.block_table("a") == [0, 1, 2]


def test_prefix_reuse_shares_full_blocks_and_counts_hits():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = toks(0, 10)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)  # blocks 0, 1 full; block 2 partial
    b = toks(0, 8) + [99, 98, 97]
    alloc = bm.allocate("b", b)
    assert alloc == Allocation((0, 1, 3), 8)
    assert bm.prefix_hits == 2 and bm.prefix_queries == 2 + 2


def test_whole_prompt_cached_still_computes_last_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = toks(0, 8)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)
    alloc = bm.allocate("b", a)  # identical prompt: last token must be recomputed
    assert alloc == Allocation((0, 2), 4)


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = toks(0, 4)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)
    bm.free("a")  # blocks 1 then 0 go to the back of the free queue
    assert bm.num_free_blocks == 4
    alloc = bm.allocate("b", toks(0, 2) + [7])  # hit on block 0, fresh block is 2
    assert alloc == Allocation((0, 2), 2)
    bm.allocate("c", toks(50, 4))  # needs 2 fresh: 3 then 1 (1 evicts a's 2nd block)
    assert bm.block_table("c") == [3, 1]
    bm.free("b")
    bm.free("c")
    again = bm.allocate("d", toks(0, 4) + [5])
    assert again.block_ids[0] == 0 and again.num_cached_tokens == 2  # block 1 was evicted


def test_truncate_frees_tail_and_unhashes_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = toks(0, 12)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)
    bm.truncate("a", 6)
    assert bm.block_table("a") == [0, 1] and bm.num_free_blocks == 6
    hit = bm.allocate("b", toks(0, 9))  # only block 0 still names a full prefix
    assert hit.num_cached_tokens == 4


def test_block_hashes_are_chained():
    h1 = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    h2 = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(h1) == 2 and h1[0] != h2[0] and h1[1] != h2[1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], 4) == h1[:1]


# ----- random operation sequences against the previous implementation ----------------
@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_on_random_operations(caching, seed):
    rng = random.Random(seed)
    num_blocks, bs = rng.choice([(16, 4), (64, 4), (200, 16)])
    new, ref = BlockManager(num_blocks, bs, caching), _ReferenceBlockManager(num_blocks, bs, caching)
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 6 * bs))] for _ in range(4)]
    tokens: dict[str, list[int]] = {}
    for step in range(600):
        op = rng.random()
        live = sorted(tokens)
        if op < 0.35 or not live:
            sid = f"s{step}"
            toks_ = rng.choice(prefixes)[:rng.randrange(1, 6 * bs)] + \
                [rng.randrange(3) for _ in range(rng.randrange(0, 3 * bs))]
            reuse = rng.random() < 0.8
            assert new.can_allocate(toks_, reuse) == ref.can_allocate(toks_, reuse)
            if rng.random() < 0.3:  # by number of tokens alone: allocate without reuse
                a = new.allocate_fresh(sid, len(toks_))
                assert a == (ref.allocate(sid, toks_, reuse_prefix=False) is not None)
            else:
                a, b = new.allocate(sid, toks_, reuse), ref.allocate(sid, toks_, reuse)
                assert a == b
            if a:
                tokens[sid] = toks_
        elif op < 0.6:
            sid = rng.choice(live)
            n = len(tokens[sid]) + rng.randrange(1, 3 * bs)
            assert new.can_append(sid, n) == ref.can_append(sid, n)
            if new.append(sid, n) != ref.append(sid, n):
                raise AssertionError("append differs")
            if len(new.block_table(sid)) * bs >= n:
                tokens[sid] = tokens[sid] + [rng.randrange(3) for _ in range(n - len(tokens[sid]))]
        elif op < 0.7:
            sid = rng.choice(live)
            new.commit_full_blocks(sid, tokens[sid])
            ref.commit_full_blocks(sid, tokens[sid])
        elif op < 0.8:
            sid = rng.choice(live)
            n = rng.randrange(0, len(tokens[sid]) + 1)
            new.truncate(sid, n)
            ref.truncate(sid, n)
            tokens[sid] = tokens[sid][:n]
        else:
            sid = rng.choice(live)
            new.free(sid)
            ref.free(sid)
            del tokens[sid]
        assert new.num_free_blocks == ref.num_free_blocks
        assert (new.prefix_hits, new.prefix_queries) == (ref.prefix_hits, ref.prefix_queries)
        for sid in tokens:
            assert list(new.block_table(sid)) == ref.block_table(sid)
    assert new._cached == ref._cached


class _ReferenceBlockManager:
    """The block manager before its no-prefix-caching fast path (kept verbatim as the
    reference: the same block ids, hits and free counts after every operation)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks  # block id -> sequences holding it
        self._hash: list[int | None] = [None] * num_blocks  # set once full and hashed
        self._queue = list(range(num_blocks))  # free ids from _head on, least recently freed first
        self._head = 0
        self._base = 0  # position of _queue[0] since the start (the queue is trimmed)
        self._queued_at = list(range(num_blocks))  # block id -> position of its live entry
        self._num_free = num_blocks
        self._stale = 0  # entries of revived blocks still in the queue
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[str, list[int]] = {}  # seq id -> block ids
        self._hashed: dict[str, int] = {}  # seq id -> number of its blocks already hashed
        self.prefix_queries = 0  # blocks looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ----- queries -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, token_ids: list[int], reuse: bool = True) -> list[int]:
        """Cached block ids for the longest cached prefix (never the whole prompt:
        the last token must be computed to get its logits)."""
        if not (self.enable_prefix_caching and reuse):
            return []
        hits = []
        for h in block_hashes(token_ids[:-1], self.block_size):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, token_ids: list[int], reuse_prefix: bool = True) -> bool:
        return self._fits(len(token_ids), self._prefix_hits(token_ids, reuse_prefix))

    def _fits(self, num_tokens: int, hits: list[int]) -> bool:
        """Free blocks suffice for the fresh blocks plus cached hits to revive."""
        revived = sum(1 for b in hits if self._ref[b] == 0)
        return self.blocks_needed(num_tokens) - len(hits) + revived <= self.num_free_blocks

    # ----- mutations -----------------------------------------------------
    def allocate(self, seq_id: str, token_ids: list[int],
                 reuse_prefix: bool = True) -> Allocation | None:
        """Blocks for a whole prompt, reusing cached prefix blocks unless told
        not to (KV about to arrive from elsewhere); None if full."""
        assert seq_id not in self._tables, f"sequence {seq_id} already allocated"
        if not token_ids:
            return None
        hits = self._prefix_hits(token_ids, reuse_prefix)
        if not self._fits(len(token_ids), hits):
            return None
        if self.enable_prefix_caching and reuse_prefix:
            self.prefix_queries += (len(token_ids) - 1) // self.block_size
        self.prefix_hits += len(hits)
        for b in hits:
            self._take(b)
        fresh = self._take_fresh(self.blocks_needed(len(token_ids)) - len(hits))
        self._tables[seq_id] = hits + fresh
        self._hashed[seq_id] = len(hits)
        return Allocation(tuple(hits + fresh), len(hits) * self.block_size)

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens in total."""
        extra = self.blocks_needed(num_tokens) - len(self._tables[seq_id])
        return extra <= self.num_free_blocks

    def append(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's table to hold ``num_tokens`` tokens; False if full."""
        if not self.can_append(seq_id, num_tokens):
            return False
        table = self._tables[seq_id]
        table += self._take_fresh(self.blocks_needed(num_tokens) - len(table))
        return True

    def commit_full_blocks(self, seq_id: str, token_ids: list[int]) -> None:
        """Hash the sequence's blocks that became full and hold computed KV
        (``token_ids`` = the tokens whose KV is written), so later requests can
        reuse them."""
        if not self.enable_prefix_caching:
            return
        table, done = self._tables[seq_id], self._hashed[seq_id]
        full = min(len(token_ids) // self.block_size, len(table))
        if full <= done:
            return
        hashes = block_hashes(token_ids[:full * self.block_size], self.block_size)
        for i in range(done, full):
            if hashes[i] not in self._cached:
                self._hash[table[i]] = hashes[i]
                self._cached[hashes[i]] = table[i]
        self._hashed[seq_id] = full

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Shrink the sequence to ``num_tokens`` tokens (speculative rollback);
        blocks past the end are freed, a partial tail block loses its hash."""
        table = self._tables[seq_id]
        keep = self.blocks_needed(num_tokens)
        self._release(reversed(table[keep:]))
        del table[keep:]
        full = num_tokens // self.block_size
        if self._hashed[seq_id] > full:
            for b in table[full:]:
                self._unhash(b)
            self._hashed[seq_id] = full

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks; hashed ones stay reusable until evicted."""
        self._release(reversed(self._tables.pop(seq_id)))
        self._hashed.pop(seq_id)

    # ----- internals -----------------------------------------------------
    def _take(self, block_id: int) -> None:
        if self._ref[block_id] == 0:  # a cached block revived from the free queue
            self._queued_at[block_id] = -1
            self._num_free -= 1
            self._stale += 1
        self._ref[block_id] += 1

    def _take_fresh(self, n: int) -> list[int]:
        """The ``n`` least recently freed blocks (their cached hashes evicted)."""
        if n <= 0:
            return []
        head = self._head
        if self._stale:
            ids, self._head = self._live_entries(head, n)
        else:
            ids, self._head = self._queue[head:head + n], head + n
        self._num_free -= n
        ref = self._ref
        for b in ids:
            ref[b] = 1
        if self._cached:
            for b in ids:
                self._unhash(b)
        if self._head > 1024 and 2 * self._head > len(self._queue):
            del self._queue[:self._head]
            self._base += self._head
            self._head = 0
        return ids

    def _live_entries(self, head: int, n: int) -> tuple[list[int], int]:
        """``n`` free blocks from queue position ``head``, dropping stale entries."""
        queue, queued_at, base = self._queue, self._queued_at, self._base
        ids: list[int] = []
        while len(ids) < n:
            b = queue[head]
            if queued_at[b] == base + head:
                ids.append(b)
            else:
                self._stale -= 1
            head += 1
        return ids, head

    def _unhash(self, block_id: int) -> None:
        h = self._hash[block_id]
        if h is not None:
            if self._cached.get(h) == block_id:
                del self._cached[h]
            self._hash[block_id] = None

    def _release(self, block_ids) -> None:
        """Drop one reference to each block, in order; unreferenced ones join the
        back of the free queue."""
        ref, queue = self._ref, self._queue
        if not self.enable_prefix_caching:  # no sharing, no revival: one owner per block
            ids = list(block_ids)
            assert all(map(ref.__getitem__, ids)), "a block freed twice"
            for b in ids:
                ref[b] = 0
            queue += ids
            self._num_free += len(ids)
            return
        queued_at = self._queued_at
        for b in block_ids:
            n = ref[b]
            assert n > 0, f"block {b} freed twice"
            ref[b] = n - 1
            if n == 1:
                queued_at[b] = self._base + len(queue)
                queue.append(b)
                self._num_free += 1
