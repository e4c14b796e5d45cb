"""Turns a step's work items into one forward pass and returns logits.

Lifecycle: built once per engine around the loaded model and the KV cache;
``run(items)`` is called every step. Decode items (one token with KV already
cached) are put first so attention can batch them; prefill chunks follow as
segments. On CPU the runner keeps a ``DecodeKVBuffer``: decode rows are
placed in it (ordered by their slot) and attention reads contiguous views
instead of gathering paged blocks every layer; the engine calls
``forget(seq_id)`` when a sequence's blocks are freed. With
``cpu_kernels=True`` (CPU, float32) the runner loads the C++ kernels of
``kernels.cpu_kernels`` once, at construction (compiled on first use on the
machine), sets ``meta.cpu_kernels`` every step and keeps no decode buffer:
decode rows read their own blocks of the paged cache in place, and only
their own context; RMSNorm is one op. Where the kernels cannot load or do
not support the model, the runner works as without them.

On CUDA the index tensors built on the host are copied to the device, decode
attention is the Triton kernel over the paged cache, prompts with nothing
cached are laid out as one padded batch for a single causal attention call
(``PaddedPrefill``), and decode-only steps replay a CUDA graph
(``workers.cuda_graphs.DecodeGraphs``) when the engine gives the runner one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.cpu_kernels import SUPPORTED_GROUPS, SUPPORTED_HEAD_DIMS
from kernels.cpu_kernels import load as load_cpu_kernels
from workers.cuda_graphs import DecodeGraphs
from workers.kv_cache import DecodeKVBuffer, DecodeStep, KVCache, int_tensor
from workers.model import AttentionMetadata, LlamaForCausalLM, PaddedPrefill, PrefillSegment


@dataclass(frozen=True)
class RunItem:
    token_ids: list[int]  # tokens computed this step
    start_pos: int  # position of token_ids[0] (= tokens already cached)
    block_table: list[int]  # physical blocks of the whole sequence
    logits: str = "last"  # "none" | "last" | "all" positions to return logits for
    seq_id: str | None = None  # names the sequence across steps (decode buffer); None = never reused

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start_pos > 0


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, decode_buffer_bytes: int = 0,
                 cpu_kernels: bool = False, graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv = kv_cache
        self.device = kv_cache.data.device
        on_cpu = self.device.type == "cpu"
        self.cpu_kernels = (cpu_kernels and on_cpu and _kernel_fits(model, kv_cache)
                            and load_cpu_kernels())
        self.decode_buffer = (DecodeKVBuffer(kv_cache, decode_buffer_bytes)
                              if on_cpu and decode_buffer_bytes > 0 and not self.cpu_kernels
                              else None)
        # GPU: prompts with nothing cached attend in one padded call (PaddedPrefill); on
        # CPU, where attention FLOPs are the cost and padding would add some, per segment
        self.padded_prefill = not on_cpu
        self.graphs = graphs  # CUDA graphs of decode-only steps; None = eager

    def _graphable(self, items: list[RunItem]) -> bool:
        width = self.graphs.width  # a longer table (never within max_model_len) runs eagerly
        return self.graphs.fits(len(items)) and all(
            it.is_decode and it.logits == "last" and len(it.block_table) <= width
            for it in items)

    def forget(self, seq_id: str) -> None:
        """The sequence's blocks were freed (finished, aborted, preempted)."""
        if self.decode_buffer is not None:
            self.decode_buffer.forget(seq_id)

    @torch.inference_mode()
    def run(self, items: list[RunItem],
            on_layer: Callable[[int], None] | None = None) -> list[torch.Tensor | None]:
        """Logits per item, in the items' order: (1, V), (n, V) or None."""
        if self.graphs is not None and on_layer is None and self._graphable(items):
            logits = self.graphs.run([it.token_ids[0] for it in items],
                                     [it.start_pos for it in items],
                                     [it.block_table for it in items])
            return list(logits.split(1))
        decodes = [i for i, it in enumerate(items) if it.is_decode]
        others = [i for i, it in enumerate(items) if not it.is_decode]
        step = self._place(items, decodes, others)
        if step is not None:
            decodes = [decodes[r] for r in step.order]
        order = decodes + others
        input_ids, positions, meta, rows, counts = self._prepare([items[i] for i in order], step)
        hidden = self.model(input_ids, positions, meta, self.kv.layer_caches, on_layer)  # (T, d)
        out: list[torch.Tensor | None] = [None] * len(items)
        if rows:
            if len(rows) < hidden.shape[0]:  # else every row, in order (all decodes)
                hidden = hidden[self._to_device(int_tensor(rows))]
            logits = self.model.compute_logits(hidden)  # (n, V)
            for idx, n, lg in zip(order, counts, logits.split(counts)):
                out[idx] = lg if n else None
        return out

    def _place(self, items: list[RunItem], decodes: list[int],
               others: list[int]) -> DecodeStep | None:
        """Put this step's decode rows in the decode buffer, if it can serve them."""
        buf = self.decode_buffer
        if buf is None:
            return None
        for i in others:  # their paged KV from start_pos on is (re)written
            if items[i].seq_id is not None:
                buf.truncate(items[i].seq_id, items[i].start_pos)
        rows = [items[i] for i in decodes]
        if not rows or any(it.seq_id is None for it in rows):
            return None
        return buf.place([it.seq_id for it in rows], [it.start_pos for it in rows],
                         [it.block_table for it in rows])

    def _prepare(self, items: list[RunItem], step: DecodeStep | None):
        """Token ids, positions, slots and attention metadata of one step, built on
        the host and moved in one copy. ``items`` come decodes first (``run``'s
        order). Prompt chunks are laid out with numpy, not token by token: a
        batch of prompts is thousands of rows, which Python would build slower
        than a GPU runs the step."""
        bs = self.kv.block_size
        ids, pos, slots, rows, counts, chunks = [], [], [], [], [], []
        num_decode = 0
        for it in items:
            start, n, first = len(ids), len(it.token_ids), it.start_pos
            ids += it.token_ids
            if it.is_decode:  # one token, one slot
                num_decode += 1
                pos.append(first)
                slots.append(it.block_table[first // bs] * bs + first % bs)
            else:
                chunks.append((start, n, first, it.block_table))
            wanted = _logit_rows(start, n, it.logits)
            rows += wanted
            counts.append(len(wanted))
        T = len(ids)
        if chunks:
            packed, prefills = self._pack_chunks(ids, pos, slots, chunks)
        else:  # decode-only: a few short lists are cheaper than numpy
            packed, prefills = self._to_device(int_tensor(ids + pos + slots)), []
        paged = [] if step is not None else items[:num_decode]  # the buffer needs no tables
        tables, context_lens = _decode_tables(paged, self._to_device)
        meta = AttentionMetadata(
            slot_mapping=packed[2 * T:3 * T],
            num_decode=num_decode,
            decode_block_tables=tables,
            decode_context_lens=context_lens,
            prefills=prefills,
            decode_step=step,
            cpu_kernels=self.cpu_kernels,
            padded_prefill=self._padded(prefills) if self.padded_prefill else None,
        )
        return packed[:T], packed[T:2 * T], meta, rows, counts

    def _pack_chunks(self, ids: list[int], pos: list[int], slots: list[int], chunks: list
                     ) -> tuple[torch.Tensor, list[PrefillSegment]]:
        """One (3T + blocks,) tensor: ids, positions, slots (the decodes' from the
        lists, then each chunk's), then every chunk's block table; the segments'
        tables are views of it."""
        bs = self.kv.block_size
        parts_pos, parts_slot, tables = [np.asarray(pos, np.int64)], [np.asarray(slots, np.int64)], []
        for _, n, first, table in chunks:
            p = np.arange(first, first + n, dtype=np.int64)
            t = np.asarray(table, np.int64)
            parts_pos.append(p)
            parts_slot.append(t[p // bs] * bs + p % bs)
            tables.append(t)
        flat = np.concatenate([np.asarray(ids, np.int64), *parts_pos, *parts_slot, *tables])
        packed = self._to_device(torch.from_numpy(flat))
        at, prefills = 3 * len(ids), []
        for (start, n, first, _), t in zip(chunks, tables, strict=True):
            prefills.append(PrefillSegment(start, n, first + n, packed[at:at + len(t)]))
            at += len(t)
        return packed, prefills

    def _padded(self, prefills: list[PrefillSegment]) -> PaddedPrefill | None:
        """The fresh segments as one padded batch, when there are two or more."""
        fresh = [seg for seg in prefills if seg.context_len == seg.num_tokens]
        if len(fresh) < 2:
            return None
        starts = np.array([seg.start for seg in fresh], np.int64)
        lens = np.array([seg.num_tokens for seg in fresh], np.int64)
        longest, n = int(lens.max()), int(lens.sum())
        seg = np.repeat(np.arange(len(fresh), dtype=np.int64), lens)  # each row's segment
        within = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        # padded slot -> a row of its own segment (the last one past the segment's end)
        gather = starts[:, None] + np.minimum(np.arange(longest), lens[:, None] - 1)
        packed = self._to_device(torch.from_numpy(
            np.concatenate([starts[seg] + within, seg * longest + within, gather.ravel()])))
        return PaddedPrefill(packed[:n], packed[n:2 * n], packed[2 * n:], len(fresh), longest)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host-built index tensor on the cache's device (a no-op on CPU)."""
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)


def _kernel_fits(model: LlamaForCausalLM, kv_cache: KVCache) -> bool:
    """The C++ kernels handle this model's dtype and head shapes."""
    cfg = model.cfg
    return (kv_cache.data.dtype == torch.float32
            and cfg.num_heads // cfg.num_kv_heads in SUPPORTED_GROUPS
            and cfg.head_dim in SUPPORTED_HEAD_DIMS)


def _logit_rows(start: int, n: int, which: str) -> range:
    if which == "none":
        return range(0)
    if which == "last":
        return range(start + n - 1, start + n)
    return range(start, start + n)


def _decode_tables(decodes: list[RunItem], to_device: Callable[[torch.Tensor], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables (B, max_blocks) int32, zero-padded, and context lengths
    (B,) int32 of paged decode rows: views of one tensor, moved by ``to_device``."""
    width = max((len(d.block_table) for d in decodes), default=0)
    flat = [b for d in decodes for b in d.block_table + [0] * (width - len(d.block_table))]
    packed = to_device(int_tensor(flat + [d.start_pos + 1 for d in decodes], torch.int32))
    return packed[:len(flat)].view(len(decodes), width), packed[len(flat):]
