"""The physical paged KV cache, and the contiguous decode buffer beside it.

Lifecycle of the paged cache: sized from a byte budget when the engine starts
(``num_blocks_for_budget``), allocated once, then written by attention at the
slots the model runner computes and read by attention and KV transfer.
Which block belongs to which sequence is ``BlockManager``'s business.

Layout::

    data: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
                       |   '- block b holds tokens [b_i*bs, (b_i+1)*bs) of
                       |      the sequence whose table lists b at index b_i
                       '- 0 = keys, 1 = values
    layer l -> (data[l, 0], data[l, 1]), each (num_blocks, block_size, KVH, D)
    slot s  -> block s // block_size, offset s % block_size
    layer_caches[l].slots -> (num_blocks * block_size, 2, KVH, D): a step
                     writes the new keys and values of its tokens in one index_put

``DecodeKVBuffer`` (CPU only) keeps a second, contiguous copy of the KV of
the sequences that decode, so that decode attention reads (B, KVH, L, D)
views instead of gathering every sequence's blocks in every layer and step.
Sequences are grouped by context length (buckets of doubling limits) so a
long context does not make every short one read padding. The paged cache
stays the source of truth; see the class docstring.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import NamedTuple

import torch

from workers.model_config import ModelConfig

_TYPECODES = {torch.int64: "q", torch.int32: "i"}


def int_tensor(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` for a flat list of ints, about 10x
    cheaper: the list is packed by ``array`` in C, not inspected per element
    (the runner builds a few such tensors every step)."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array(_TYPECODES[dtype], values), dtype=dtype)


def num_blocks_for_budget(cfg: ModelConfig, budget_bytes: int, block_size: int,
                          dtype: torch.dtype) -> int:
    per_block = cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={budget_bytes} holds no block; one block of {block_size} "
            f"tokens needs {per_block} bytes")
    return int(blocks)


class LayerCache(NamedTuple):
    """One layer of the paged cache, as attention reads and writes it."""

    k: torch.Tensor  # (num_blocks, block_size, KVH, D)
    v: torch.Tensor  # (num_blocks, block_size, KVH, D)
    slots: torch.Tensor  # (num_blocks * block_size, 2, KVH, D): the same memory by slot


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(cfg.num_layers, 2, num_blocks, block_size,
                                cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(cfg.num_layers)]
        self.layer_caches = [LayerCache(k, v, self.data[i].flatten(1, 2).transpose(0, 1))
                             for i, (k, v) in enumerate(self.layers)]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


MIN_BUCKET_TOKENS = 64  # longest context of the smallest decode bucket; each next one doubles


def bucket_limit(context_len: int) -> int:
    """The decode bucket a context of ``context_len`` tokens lives in, named
    by the longest context it takes (64, 128, 256, ...). Finer steps (1.5x)
    measured no faster: more attention calls and moves ate the saved padding."""
    return max(MIN_BUCKET_TOKENS, 1 << (context_len - 1).bit_length())


@dataclass
class _Mirrored:
    """One sequence held in the decode buffer."""

    seq_id: str
    length: int  # leading positions whose KV the buffer holds (positions past it are zero)
    blocks: tuple[int, ...]  # the sequence's block table when it last decoded
    slot: int = 0  # its row in the bucket (set by _Bucket.add)


@dataclass(frozen=True)
class DecodeGroup:
    """Consecutive decode rows whose sequences share a bucket: one attention
    call per layer. Built once per step; every layer reads the same views."""

    rows: int  # how many rows (they follow the previous group's); slots 0..rows-1
    slots: torch.Tensor  # (rows,) int64: 0..rows-1, where each row's new K/V goes
    positions: torch.Tensor  # (rows,) int64: ... and at which position
    context_len: int  # L: the group's longest context, new token included
    mask: torch.Tensor | None  # (rows, 1, 1, L) additive 0/-inf; None when all rows have L
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (rows, KVH, L, D) keys, values
    writes: list[torch.Tensor]  # per layer (S, C, 2, KVH, D): [slot, position] <- (2, KVH, D)


@dataclass(frozen=True)
class DecodeStep:
    """Where this step's decode rows live in the buffer."""

    order: list[int]  # caller's decode rows, group after group
    groups: list[DecodeGroup]


class _Bucket:
    """Sequences whose context fits ``limit`` tokens. Slot s of ``data``
    (num_layers, 2, S, KVH, C, D) holds ``entries[s]``; S and C (<= limit)
    grow on demand. A removed entry leaves a hole (None) until ``compact``
    moves the last entries into the holes, so that a step's rows are slots
    0..n-1. Positions at or past a held entry's ``length`` are zero; slots
    past the entries hold garbage (never read) until ``add`` takes them."""

    def __init__(self, like: torch.Tensor, limit: int):
        layers, _, _, _, kv_heads, head_dim = like.shape
        self.limit = limit
        self.entries: list[_Mirrored | None] = []
        self.held = 0  # entries that are not holes
        self._set_data(like.new_zeros((layers, 2, 0, kv_heads, 0, head_dim)))

    def _set_data(self, data: torch.Tensor) -> None:
        self.data = data
        self.writes = list(data.permute(0, 2, 4, 1, 3, 5).unbind(0))  # per layer (S, C, 2, KVH, D)

    @property
    def slots(self) -> int:
        return self.data.shape[2]

    @property
    def tokens(self) -> int:
        return self.data.shape[4]

    def reserve(self, slots: int, tokens: int) -> None:
        """Grow to at least (slots, tokens): the old content is copied, the
        new positions of old slots zeroed; new slots are zeroed by ``add``."""
        if slots > self.slots or tokens > self.tokens:
            shape = list(self.data.shape)
            shape[2], shape[4] = max(slots, self.slots), max(tokens, self.tokens)
            data = self.data.new_empty(shape)
            data[:, :, :self.slots, :, :self.tokens] = self.data
            data[:, :, :self.slots, :, self.tokens:] = 0
            self._set_data(data)

    def add(self, entry: _Mirrored, first_zero: int) -> None:
        """Take the next slot; positions from ``first_zero`` on are zeroed
        (the caller writes the ones before)."""
        assert len(self.entries) < self.slots, "reserve before add"
        entry.slot = len(self.entries)
        self.entries.append(entry)
        self.held += 1
        self.zero(entry.slot, first_zero)

    def remove(self, entry: _Mirrored) -> None:
        self.entries[entry.slot] = None
        self.held -= 1

    def compact(self) -> None:
        """Move the last entries into the holes (one slot copy each)."""
        for slot in range(self.held):
            if self.entries[slot] is None:
                last = self._pop_last()
                self.data[:, :, slot] = self.data[:, :, last.slot]
                self.entries[slot], last.slot = last, slot
        del self.entries[self.held:]

    def _pop_last(self) -> _Mirrored:
        while self.entries[-1] is None:
            self.entries.pop()
        return self.entries.pop()

    def zero(self, slot: int, first: int) -> None:
        self.data[:, :, slot, :, first:] = 0


class DecodeKVBuffer:
    """A contiguous copy of the decoding sequences' KV (CPU decode fast path).

    Layout: buckets for contexts of up to 64, 128, 256, ... tokens; a
    sequence lives in the smallest bucket its context fits (moving up, one
    copy, when it outgrows it), at some slot s: position p of its context is
    at ``bucket.data[:, :, s, :, p]``. Each bucket is one attention call over
    its own longest context, so padding stays within a bucket's spread.
    Memory grows on demand (slots and positions) within ``budget_bytes``.

    Lifecycle, driven by the model runner once per step with decode rows:

    1. ``place(seq_ids, starts, tables)``: sequences not decoding this step
       leave (holes are filled by the last slots, one copy each); the others
       settle in their bucket; positions a sequence has
       not mirrored yet (it just finished its prefill, verified a draft, or
       its blocks changed) are copied once from the paged cache. Returns a
       ``DecodeStep``, or None when the memory would exceed the budget (then
       the buffer empties and attention gathers from the paged cache).
    2. attention writes each layer's new K/V at each group's (slot,
       position) pairs (and into the paged cache as always) and reads
       ``[:rows, :, :L]`` views of the group's bucket.

    Its tensors are inference tensors: every public method runs under
    ``torch.inference_mode``. Anything else that writes a sequence's paged
    KV must tell the buffer: ``truncate(seq_id, n)`` (the runner does so for
    prefill and verify chunks starting at n), ``forget(seq_id)`` (the engine
    does so when a sequence's blocks are freed: finish, abort, preemption).
    """

    def __init__(self, cache: KVCache, budget_bytes: int):
        self.cache, self.budget_bytes = cache, budget_bytes
        self.block_size = cache.block_size
        layers, _, _, _, kv_heads, head_dim = cache.data.shape
        self.bytes_per_token = layers * 2 * kv_heads * head_dim * cache.data.element_size()
        self._buckets: dict[int, _Bucket] = {}  # limit -> bucket
        self._where: dict[str, tuple[_Bucket, _Mirrored]] = {}

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._where

    def length(self, seq_id: str) -> int:
        return self._where[seq_id][1].length

    @property
    def nbytes(self) -> int:
        return sum(b.slots * b.tokens for b in self._buckets.values()) * self.bytes_per_token

    # ----- the step ------------------------------------------------------
    @torch.inference_mode()
    def place(self, seq_ids: list[str], starts: list[int],
              tables: list[list[int]]) -> DecodeStep | None:
        """Slots for this step's decode rows (row r: ``starts[r]`` tokens
        cached, its new token at that position); None = use the paged cache."""
        live = set(seq_ids)
        for seq_id in [s for s in self._where if s not in live]:
            self.forget(seq_id)
        for bucket in self._buckets.values():
            bucket.compact()
        targets = [bucket_limit(start + 1) for start in starts]
        if not self._in_place(seq_ids, starts, targets) and not self._reserve(
                seq_ids, starts, targets):
            self.clear()
            return None
        for seq_id, start, table, limit in zip(seq_ids, starts, tables, targets):
            self._settle(seq_id, start, table, self._buckets[limit])
        self._buckets = {c: b for c, b in self._buckets.items() if b.held}
        for bucket in self._buckets.values():  # fill the holes movers left
            bucket.compact()
        return self._step(seq_ids, starts)

    def _settle(self, seq_id: str, start: int, table: list[int], target: _Bucket) -> None:
        """Hold positions [0, start) of the sequence in ``target``, then count
        the new token (attention writes it this step) as held."""
        bucket, entry = self._where.get(seq_id, (None, None))
        if entry is not None:
            self._trust(bucket, entry, start, table)
        if bucket is not target:
            entry = (self._add(seq_id, target, start) if entry is None
                     else self._move(entry, bucket, target, start))
        if entry.length < start:
            self._copy_from_paged(target, entry, start, table)
        entry.length, entry.blocks = start + 1, tuple(table)

    def _trust(self, bucket: _Bucket, entry: _Mirrored, start: int, table: list[int]) -> None:
        """Keep what still matches the paged cache: nothing if the blocks
        changed under it, else positions before ``start``."""
        kept = -(-entry.length // self.block_size)
        if tuple(table[:kept]) != entry.blocks[:kept]:
            bucket.zero(entry.slot, 0)
            entry.length = 0
        elif entry.length > start:
            bucket.zero(entry.slot, start)
            entry.length = start

    def _add(self, seq_id: str, target: _Bucket, start: int) -> _Mirrored:
        """A new entry: positions before ``start`` get copied in, the rest zeroed."""
        entry = _Mirrored(seq_id, 0, ())
        target.add(entry, start)
        self._where[seq_id] = (target, entry)
        return entry

    def _move(self, entry: _Mirrored, source: _Bucket, target: _Bucket, start: int) -> _Mirrored:
        moved = self._add(entry.seq_id, target, start)
        moved.length, moved.blocks, n = entry.length, entry.blocks, entry.length
        target.data[:, :, moved.slot, :, :n] = source.data[:, :, entry.slot, :, :n]
        source.remove(entry)
        return moved

    def _copy_from_paged(self, bucket: _Bucket, entry: _Mirrored, end: int,
                         table: list[int]) -> None:
        bs, first = self.block_size, entry.length
        blocks = torch.tensor(table[first // bs: -(-end // bs)], dtype=torch.int64)
        src = self.cache.data.index_select(2, blocks)  # (layers, 2, n, bs, KVH, D)
        src = src.flatten(2, 3)[:, :, first % bs: first % bs + end - first]  # (layers, 2, len, KVH, D)
        bucket.data[:, :, entry.slot, :, first:end] = src.transpose(2, 3)  # (layers, 2, KVH, len, D)

    def _step(self, seq_ids: list[str], starts: list[int]) -> DecodeStep:
        """Rows grouped by bucket, in slot order: every entry of every bucket
        decodes this step, so a group's rows are its bucket's slots 0..n-1."""
        by_slot = {limit: [0] * b.held for limit, b in self._buckets.items()}
        for row, seq_id in enumerate(seq_ids):
            bucket, entry = self._where[seq_id]
            by_slot[bucket.limit][entry.slot] = row
        order, groups = [], []
        for limit in sorted(by_slot):
            rows = by_slot[limit]
            order += rows
            groups.append(_group(self._buckets[limit], [starts[r] for r in rows]))
        return DecodeStep(order, groups)

    # ----- membership ----------------------------------------------------
    @torch.inference_mode()
    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """The sequence's paged KV from ``num_tokens`` on is being rewritten."""
        bucket, entry = self._where.get(seq_id, (None, None))
        if entry is not None and entry.length > num_tokens:
            bucket.zero(entry.slot, num_tokens)
            entry.length = num_tokens

    @torch.inference_mode()
    def forget(self, seq_id: str) -> None:
        """Drop a sequence (its blocks were freed); an emptied bucket's memory goes."""
        bucket, entry = self._where.pop(seq_id, (None, None))
        if entry is not None:
            bucket.remove(entry)
            if not bucket.held:
                del self._buckets[bucket.limit]

    @torch.inference_mode()
    def clear(self) -> None:
        """Drop every sequence and release the memory."""
        self._buckets.clear()
        self._where.clear()

    # ----- memory --------------------------------------------------------
    def _in_place(self, seq_ids: list[str], starts: list[int], targets: list[int]) -> bool:
        """Every sequence already sits in its bucket, with room for its new token."""
        for seq_id, start, limit in zip(seq_ids, starts, targets):
            bucket = self._where.get(seq_id, (None,))[0]
            if bucket is None or bucket.limit != limit or bucket.tokens <= start:
                return False
        return True

    def _reserve(self, seq_ids: list[str], starts: list[int], targets: list[int]) -> bool:
        """Grow each bucket for the sequences that will be in it (movers are
        counted in both buckets, briefly true) and their contexts, within
        the budget."""
        slots = {c: b.held for c, b in self._buckets.items()}
        tokens = {c: 0 for c in self._buckets}
        for seq_id, start, limit in zip(seq_ids, starts, targets):
            bucket = self._where.get(seq_id, (None,))[0]
            if bucket is None or bucket.limit != limit:
                slots[limit] = slots.get(limit, 0) + 1
            tokens[limit] = max(tokens.get(limit, 0), start + 1)
        have = {c: (b.slots, b.tokens) for c, b in self._buckets.items()}
        roomy, exact = {}, {}
        for c in slots:
            have_slots, have_tokens = have.get(c, (0, 0))
            roomy[c] = (_grow(slots[c], have_slots, 8, 2.0),
                        min(c, _grow(tokens[c], have_tokens, 64, 1.25)))
            exact[c] = (max(slots[c], have_slots), max(tokens[c], have_tokens))
        for plan in (roomy, exact):
            if sum(n * t for n, t in plan.values()) * self.bytes_per_token <= self.budget_bytes:
                break
        else:
            return False
        for limit, (n, t) in plan.items():
            if limit not in self._buckets:
                self._buckets[limit] = _Bucket(self.cache.data, limit)
            self._buckets[limit].reserve(n, t)
        return True


def _group(bucket: _Bucket, starts: list[int]) -> DecodeGroup:
    """The group of a bucket's ``len(starts)`` rows (slots 0..n-1) and the
    per-layer views its attention reads and writes."""
    n = len(starts)
    pos = int_tensor(starts)  # (n,)
    context_len = max(starts) + 1
    mask = None
    if min(starts) + 1 != context_len:
        beyond = torch.arange(context_len)[None, :] > pos[:, None]  # (n, L)
        mask = torch.zeros(n, 1, 1, context_len, dtype=bucket.data.dtype)
        mask.masked_fill_(beyond[:, None, None, :], float("-inf"))  # (n, 1, 1, L)
    read = bucket.data[:, :, :n, :, :context_len]  # (layers, 2, n, KVH, L, D)
    layers = [kv.unbind(0) for kv in read.unbind(0)]
    return DecodeGroup(n, torch.arange(n), pos, context_len, mask, layers, bucket.writes)


def _grow(need: int, have: int, multiple: int, factor: float) -> int:
    """``have`` if enough, else at least ``need`` and ``factor`` x ``have``,
    rounded up to ``multiple`` (each growth copies the bucket)."""
    if need <= have:
        return have
    want = max(need, int(have * factor))
    return -(-want // multiple) * multiple
