"""Paged KV cache bookkeeping: which physical blocks hold which tokens.

Pure Python (no torch): the memory itself lives in ``kv_cache.KVCache``; this
module only hands out block ids, so the simulator uses it as is.

Lifecycle of a block::

    free (no hash) --allocate--> owned (ref_count >= 1) --free, ref 0-->
    free-but-cached (hash kept, reusable by a later prefix hit, evicted LRU
    when a fresh block is needed) --prefix hit--> owned again

Prefix reuse: a *full* block is named by a chained hash
``h_i = H(h_{i-1}, tokens of block i)``, so equal hashes mean equal prefixes.
Out of memory is a value (``None`` / ``False``), never an exception.

The free queue is a list read from a head index, so a prompt's fresh blocks
are one slice (the simulator allocates millions); a cached block revived
from the middle of the queue leaves a stale entry behind, skipped when the
head reaches it.

Without prefix caching a block has one owner and is never revived, so no
per-block state is kept: a prompt takes one slice of the queue and a
freed table goes back in one ``extend`` (the same block ids, in the same
order, as with caching on and nothing cached). The queue and the block
tables are then ``array('q')``s: slices and extends copy machine integers,
with no reference count to touch per block (the simulator moves some 150
block ids per request, a million requests a run).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import dataclass


def _token_bytes(token_ids: tuple[int, ...]) -> bytes:
    """Each id as 4 little-endian bytes (packed in C: ~2x faster than per-id to_bytes)."""
    packed = array("I", token_ids)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


_BIG_ENDIAN = sys.byteorder == "big"


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Stable 64-bit hash of a full block given its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(_token_bytes(token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Hashes of every full block of ``token_ids``."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, tuple(token_ids[start:start + block_size]))
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class Allocation:
    """Result of admitting a sequence's prompt."""

    block_ids: tuple[int, ...]  # physical blocks, in token order
    num_cached_tokens: int  # leading tokens whose KV is already in those blocks

    def __init__(self, block_ids: tuple[int, ...], num_cached_tokens: int):
        # frozen: written once, here (one per admitted prompt), as a whole new
        # __dict__ (field by field into self.__dict__ slows every later read)
        object.__setattr__(self, "__dict__", {"block_ids": block_ids,
                                              "num_cached_tokens": num_cached_tokens})


class BlockManager:
    """Allocates fixed-size KV blocks to sequences, with prefix reuse."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks  # block id -> sequences holding it (prefix caching only)
        self._hash: list[int | None] = [None] * num_blocks  # set once full and hashed
        # free ids from _head on, least recently freed first
        self._queue = list(range(num_blocks)) if enable_prefix_caching else \
            array("q", range(num_blocks))
        self._head = 0
        self._base = 0  # position of _queue[0] since the start (the queue is trimmed)
        # block id -> position of its live entry (prefix caching only)
        self._queued_at = list(range(num_blocks)) if enable_prefix_caching else []
        self.num_free_blocks = num_blocks  # read-only outside (an attribute: read per step)
        self._stale = 0  # entries of revived blocks still in the queue
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[str, list[int] | array] = {}  # seq id -> block ids
        self._hashed: dict[str, int] = {}  # seq id -> its blocks already hashed (caching only)
        self.prefix_queries = 0  # blocks looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ----- queries -------------------------------------------------------
    def block_table(self, seq_id: str) -> list[int] | array:
        """The sequence's block ids, in token order (the table itself: a list, an
        ``array('q')`` without prefix caching)."""
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
        if not (self.enable_prefix_caching and reuse_prefix):  # fresh blocks only
            table = self._allocate_fresh(seq_id, len(token_ids))
            return None if table is None else Allocation(tuple(table), 0)
        assert seq_id not in self._tables, f"sequence {seq_id} already allocated"
        if not token_ids:
            return None
        hits = self._prefix_hits(token_ids, reuse_prefix)
        if not self._fits(len(token_ids), hits):
            return None
        self.prefix_queries += (len(token_ids) - 1) // self.block_size
        self.prefix_hits += len(hits)
        for b in hits:
            self._take(b)
        fresh = self._take_fresh(self.blocks_needed(len(token_ids)) - len(hits))
        self._tables[seq_id] = hits + fresh
        self._hashed[seq_id] = len(hits)
        return Allocation(tuple(hits + fresh), len(hits) * self.block_size)

    def allocate_fresh(self, seq_id: str, num_tokens: int) -> bool:
        """Fresh blocks for a ``num_tokens``-token prompt, no prefix reuse:
        ``allocate`` with ``reuse_prefix=False`` (or without prefix caching) when
        the caller needs no ``Allocation`` and has no token ids at hand. False if
        full."""
        assert seq_id not in self._tables, f"sequence {seq_id} already allocated"
        n = -(-num_tokens // self.block_size)
        if num_tokens <= 0 or n > self.num_free_blocks:
            return False
        self._tables[seq_id] = self._take_fresh(n)
        if self.enable_prefix_caching:
            self._hashed[seq_id] = 0
        return True

    def _allocate_fresh(self, seq_id: str, num_tokens: int) -> list[int] | None:
        assert seq_id not in self._tables, f"sequence {seq_id} already allocated"
        n = -(-num_tokens // self.block_size)
        if num_tokens <= 0 or n > self.num_free_blocks:
            return None
        table = self._tables[seq_id] = self._take_fresh(n)
        if self.enable_prefix_caching:
            self._hashed[seq_id] = 0
        return table

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens in total."""
        extra = self.blocks_needed(num_tokens) - len(self._tables[seq_id])
        return extra <= self.num_free_blocks

    def append(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's table to hold ``num_tokens`` tokens; False if full."""
        table = self._tables[seq_id]
        extra = -(-num_tokens // self.block_size) - len(table)  # can_append, written out
        if extra > self.num_free_blocks:
            return False
        if extra > 0:
            table += self._take_fresh(extra)
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
        self._release(table[:keep - 1:-1] if keep else table[::-1])
        del table[keep:]
        if not self.enable_prefix_caching:
            return
        full = num_tokens // self.block_size
        if self._hashed[seq_id] > full:
            for b in table[full:]:
                self._unhash(b)
            self._hashed[seq_id] = full

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks; hashed ones stay reusable until evicted."""
        table = self._tables.pop(seq_id)
        if not self.enable_prefix_caching:  # _release of its blocks, written out
            self._queue += table[::-1]
            self.num_free_blocks += len(table)
            assert self.num_free_blocks <= self.num_blocks, "a block freed twice"
            return
        self._release(table[::-1])
        del self._hashed[seq_id]

    # ----- internals -----------------------------------------------------
    def _take(self, block_id: int) -> None:
        if self._ref[block_id] == 0:  # a cached block revived from the free queue
            self._queued_at[block_id] = -1
            self.num_free_blocks -= 1
            self._stale += 1
        self._ref[block_id] += 1

    def _take_fresh(self, n: int) -> list[int]:
        """The ``n`` least recently freed blocks (their cached hashes evicted)."""
        if n <= 0:
            return self._queue[:0]  # (an empty list or array, as the queue)
        head = self._head
        if self._stale:
            ids, self._head = self._live_entries(head, n)
        else:
            ids, self._head = self._queue[head:head + n], head + n
        self.num_free_blocks -= n
        if self.enable_prefix_caching:
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

    def _release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, in order; unreferenced ones join the
        back of the free queue."""
        queue = self._queue
        if not self.enable_prefix_caching:  # one owner per block: all of them go back
            queue += block_ids
            self.num_free_blocks += len(block_ids)
            assert self.num_free_blocks <= self.num_blocks, "a block freed twice"
            return
        ref, queued_at = self._ref, self._queued_at
        for b in block_ids:
            n = ref[b]
            assert n > 0, f"block {b} freed twice"
            ref[b] = n - 1
            if n == 1:
                queued_at[b] = self._base + len(queue)
                queue.append(b)
                self.num_free_blocks += 1
