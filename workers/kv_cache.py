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

``DecodeKVBuffer`` (CPU only) keeps a second, contiguous copy of the KV of
the sequences that decode, so that decode attention reads (B, KVH, L, D)
views instead of gathering every sequence's blocks in every layer and step.
The paged cache stays the source of truth; see the class docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model_config import ModelConfig


def num_blocks_for_budget(cfg: ModelConfig, budget_bytes: int, block_size: int,
                          dtype: torch.dtype) -> int:
    per_block = cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={budget_bytes} holds no block; one block of {block_size} "
            f"tokens needs {per_block} bytes")
    return int(blocks)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(cfg.num_layers, 2, num_blocks, block_size,
                                cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(cfg.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class _Mirrored:
    """One sequence held in the decode buffer."""

    seq_id: str
    length: int  # leading positions whose KV the buffer holds (positions past it are zero)
    blocks: tuple[int, ...]  # the sequence's block table when it last decoded


@dataclass(frozen=True)
class DecodeStep:
    """Where this step's decode rows live in the buffer: row i is slot i."""

    order: list[int]  # caller's decode rows, sorted by slot
    write_index: torch.Tensor  # (B * KVH,) int64: new K/V row in a layer's (S*KVH*C, D) view
    context_len: int  # L: the longest context of the step, new token included
    mask: torch.Tensor | None  # (B, 1, 1, L) additive 0/-inf; None when every row has L tokens
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (S, KVH, C, D) keys, values


class DecodeKVBuffer:
    """A contiguous copy of the decoding sequences' KV (CPU decode fast path).

    Layout: ``data`` (num_layers, 2, S, KVH, C, D): slot s holds one sequence,
    position p of its context at [:, :, s, :, p]; S and C grow on demand
    (geometrically) within ``budget_bytes``. Invariant: positions at or past a
    slot's ``length`` are zero, so stale memory never meets a zero softmax
    weight.

    Lifecycle, driven by the model runner once per step with decode rows:

    1. ``place(seq_ids, starts, tables)``: sequences not decoding this step
       leave (the last slot moves into each hole, so slots stay 0..B-1);
       new ones take the next slots; positions a sequence has not mirrored
       yet (it just finished its prefill, verified a draft, or its blocks
       changed) are copied once from the paged cache. Returns a
       ``DecodeStep``, or None when S x C would exceed the budget (then the
       buffer empties and attention gathers from the paged cache).
    2. attention writes each layer's new K/V at ``write_index`` (and into the
       paged cache as always) and reads ``[:B, :, :L]`` views.

    Its tensors are inference tensors: every public method runs under
    ``torch.inference_mode``. Anything else that writes a sequence's paged
    KV must tell the buffer:
    ``truncate(seq_id, n)`` (the runner does so for prefill and verify
    chunks starting at n), ``forget(seq_id)`` (the engine does so when a
    sequence's blocks are freed: finish, abort, preemption).
    """

    def __init__(self, cache: KVCache, budget_bytes: int):
        self.cache, self.budget_bytes = cache, budget_bytes
        _, _, _, self.block_size, self.num_kv_heads, self.head_dim = cache.data.shape
        self.data = cache.data.new_zeros((cache.data.shape[0], 2, 0, self.num_kv_heads, 0,
                                          self.head_dim))
        self._slots: list[_Mirrored] = []
        self._index: dict[str, int] = {}  # seq id -> slot

    @property
    def bytes_per_slot_token(self) -> int:
        layers = self.data.shape[0]
        return layers * 2 * self.num_kv_heads * self.head_dim * self.data.element_size()

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._index

    def length(self, seq_id: str) -> int:
        return self._slots[self._index[seq_id]].length

    # ----- the step ------------------------------------------------------
    @torch.inference_mode()
    def place(self, seq_ids: list[str], starts: list[int],
              tables: list[list[int]]) -> DecodeStep | None:
        """Slots for this step's decode rows (row r: ``starts[r]`` tokens
        cached, its new token at that position); None = use the paged cache."""
        live = set(seq_ids)
        for seq_id in [s.seq_id for s in self._slots if s.seq_id not in live]:
            self.forget(seq_id)
        for seq_id in seq_ids:
            if seq_id not in self._index:
                self._index[seq_id] = len(self._slots)
                self._slots.append(_Mirrored(seq_id, 0, ()))
        context_len = max(starts) + 1
        if not self._reserve(len(seq_ids), context_len):
            self.clear()
            return None
        for seq_id, start, table in zip(seq_ids, starts, tables):
            self._catch_up(self._index[seq_id], start, table)
        return self._step(seq_ids, starts, context_len)

    def _catch_up(self, slot: int, start: int, table: list[int]) -> None:
        """Make the slot hold positions [0, start) of the paged KV; then
        count the new token (written by attention this step) as held."""
        entry = self._slots[slot]
        kept = -(-entry.length // self.block_size)
        if tuple(table[:kept]) != entry.blocks[:kept]:  # blocks reallocated: trust nothing
            self._zero(slot, 0)
            entry.length = 0
        elif entry.length > start:
            self.truncate(entry.seq_id, start)
        if entry.length < start:
            self._copy_from_paged(slot, entry.length, start, table)
        entry.length, entry.blocks = start + 1, tuple(table)

    def _copy_from_paged(self, slot: int, first: int, end: int, table: list[int]) -> None:
        bs = self.block_size
        blocks = torch.tensor(table[first // bs: -(-end // bs)], dtype=torch.int64)
        src = self.cache.data.index_select(2, blocks)  # (layers, 2, n, bs, KVH, D)
        src = src.flatten(2, 3)[:, :, first % bs: first % bs + end - first]  # (layers, 2, len, KVH, D)
        self.data[:, :, slot, :, first:end] = src.transpose(2, 3)  # (layers, 2, KVH, len, D)

    def _step(self, seq_ids: list[str], starts: list[int], context_len: int) -> DecodeStep:
        slots = [self._index[s] for s in seq_ids]
        order = sorted(range(len(seq_ids)), key=slots.__getitem__)
        pos = torch.tensor([starts[r] for r in order], dtype=torch.int64)  # (B,)
        batch, capacity = len(order), self.data.shape[4]
        heads = torch.arange(self.num_kv_heads)  # (KVH,)
        rows = torch.arange(batch)[:, None] * self.num_kv_heads + heads[None, :]  # (B, KVH)
        write_index = (rows * capacity + pos[:, None]).reshape(-1)  # (B * KVH,)
        mask = None
        if min(starts) + 1 != context_len:
            beyond = torch.arange(context_len)[None, :] > pos[:, None]  # (B, L)
            mask = torch.zeros(batch, 1, 1, context_len, dtype=self.data.dtype)
            mask.masked_fill_(beyond[:, None, None, :], float("-inf"))  # (B, 1, 1, L)
        layers = [(self.data[i, 0], self.data[i, 1]) for i in range(self.data.shape[0])]
        return DecodeStep(order, write_index, context_len, mask, layers)

    # ----- membership ----------------------------------------------------
    @torch.inference_mode()
    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """The sequence's paged KV from ``num_tokens`` on is being rewritten."""
        slot = self._index.get(seq_id)
        if slot is not None and self._slots[slot].length > num_tokens:
            self._zero(slot, num_tokens)
            self._slots[slot].length = num_tokens

    @torch.inference_mode()
    def forget(self, seq_id: str) -> None:
        """Drop a sequence; the last slot moves into its place."""
        slot = self._index.pop(seq_id, None)
        if slot is None:
            return
        last = self._slots.pop()
        if last.seq_id != seq_id:
            self.data[:, :, slot] = self.data[:, :, len(self._slots)]
            self._slots[slot] = last
            self._index[last.seq_id] = slot
        self._zero(len(self._slots), 0)

    @torch.inference_mode()
    def clear(self) -> None:
        """Drop every sequence and release the memory."""
        self._slots.clear()
        self._index.clear()
        self.data = self.data.new_zeros((*self.data.shape[:2], 0, self.num_kv_heads, 0,
                                         self.head_dim))

    # ----- memory --------------------------------------------------------
    def _reserve(self, num_slots: int, context_len: int) -> bool:
        """Grow to at least (num_slots, context_len) within the budget;
        geometric steps, so joining sequences and growing contexts rarely copy."""
        slots, capacity = self.data.shape[2], self.data.shape[4]
        if num_slots <= slots and context_len <= capacity:
            return True
        roomy = (_grow(num_slots, slots, 8), _grow(context_len, capacity, 64))
        exact = (max(num_slots, slots), max(context_len, capacity))
        for new_slots, new_capacity in (roomy, exact):
            if new_slots * new_capacity * self.bytes_per_slot_token <= self.budget_bytes:
                break
        else:
            return False
        data = self.data.new_zeros((*self.data.shape[:2], new_slots, self.num_kv_heads,
                                    new_capacity, self.head_dim))
        data[:, :, :slots, :, :capacity] = self.data
        self.data = data
        return True

    def _zero(self, slot: int, first: int) -> None:
        if slot < self.data.shape[2]:
            self.data[:, :, slot, :, first:] = 0


def _grow(need: int, have: int, multiple: int) -> int:
    """``have`` if enough, else at least ``need`` and 25% more than ``have``,
    rounded up to ``multiple``."""
    if need <= have:
        return have
    want = max(need, have + have // 4)
    return -(-want // multiple) * multiple
