"""Turns a step's work items into one forward pass and returns logits.

Lifecycle: built once per engine around the loaded model and the KV cache;
``run(items)`` is called every step. Decode items (one token with KV already
cached) are put first so attention can batch them; prefill chunks follow as
segments. On CPU the runner keeps a ``DecodeKVBuffer``: decode rows are
placed in it (ordered by their slot) and attention reads contiguous views
instead of gathering paged blocks every layer; the engine calls
``forget(seq_id)`` when a sequence's blocks are freed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.kv_cache import DecodeKVBuffer, DecodeStep, KVCache
from workers.model import AttentionMetadata, LlamaForCausalLM, PrefillSegment


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
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, decode_buffer_bytes: int = 0):
        self.model = model
        self.kv = kv_cache
        on_cpu = kv_cache.data.device.type == "cpu"
        self.decode_buffer = (DecodeKVBuffer(kv_cache, decode_buffer_bytes)
                              if on_cpu and decode_buffer_bytes > 0 else None)

    def forget(self, seq_id: str) -> None:
        """The sequence's blocks were freed (finished, aborted, preempted)."""
        if self.decode_buffer is not None:
            self.decode_buffer.forget(seq_id)

    @torch.inference_mode()
    def run(self, items: list[RunItem],
            on_layer: Callable[[int], None] | None = None) -> list[torch.Tensor | None]:
        """Logits per item, in the items' order: (1, V), (n, V) or None."""
        decodes = [i for i, it in enumerate(items) if it.is_decode]
        others = [i for i, it in enumerate(items) if not it.is_decode]
        step = self._place(items, decodes, others)
        if step is not None:
            decodes = [decodes[r] for r in step.order]
        order = decodes + others
        input_ids, positions, meta, rows, counts = self._prepare([items[i] for i in order], step)
        hidden = self.model(input_ids, positions, meta, self.kv.layers, on_layer)  # (T, d)
        out: list[torch.Tensor | None] = [None] * len(items)
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows)])  # (n, V)
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
        bs = self.kv.block_size
        ids, pos, slots, rows, counts, prefills = [], [], [], [], [], []
        decodes = [it for it in items if it.is_decode]
        for it in items:
            start, n = len(ids), len(it.token_ids)
            ids += it.token_ids
            span = range(it.start_pos, it.start_pos + n)
            pos += span
            slots += [it.block_table[p // bs] * bs + p % bs for p in span]
            wanted = _logit_rows(start, n, it.logits)
            rows += wanted
            counts.append(len(wanted))
            if not it.is_decode:
                prefills.append(PrefillSegment(
                    start, n, it.start_pos + n, torch.tensor(it.block_table, dtype=torch.int64)))
        paged = [] if step is not None else decodes  # the buffer needs no tables
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            num_decode=len(decodes),
            decode_block_tables=_pad_tables([d.block_table for d in paged]),
            decode_context_lens=torch.tensor([d.start_pos + 1 for d in paged], dtype=torch.int32),
            prefills=prefills,
            decode_step=step,
        )
        return torch.tensor(ids), torch.tensor(pos), meta, rows, counts


def _logit_rows(start: int, n: int, which: str) -> range:
    if which == "none":
        return range(0)
    if which == "last":
        return range(start + n - 1, start + n)
    return range(start, start + n)


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32).reshape(len(tables), width)
