"""Turns a step's work items into one forward pass and returns logits.

Lifecycle: built once per engine around the loaded model and the KV cache;
``run(items)`` is called every step. Decode items (one token with KV already
cached) are put first so attention can batch them through the paged decode
kernel; prefill chunks follow as segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.kv_cache import KVCache
from workers.model import AttentionMetadata, LlamaForCausalLM, PrefillSegment


@dataclass(frozen=True)
class RunItem:
    token_ids: list[int]  # tokens computed this step
    start_pos: int  # position of token_ids[0] (= tokens already cached)
    block_table: list[int]  # physical blocks of the whole sequence
    logits: str = "last"  # "none" | "last" | "all" positions to return logits for

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start_pos > 0


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache):
        self.model = model
        self.kv = kv_cache

    @torch.inference_mode()
    def run(self, items: list[RunItem],
            on_layer: Callable[[int], None] | None = None) -> list[torch.Tensor | None]:
        """Logits per item, in the items' order: (1, V), (n, V) or None."""
        order = sorted(range(len(items)), key=lambda i: not items[i].is_decode)
        ordered = [items[i] for i in order]
        input_ids, positions, meta, rows = self._prepare(ordered)
        hidden = self.model(input_ids, positions, meta, self.kv.layers, on_layer)  # (T, d)
        wanted = [r for r in rows if r is not None]
        logits = self.model.compute_logits(hidden[torch.cat(wanted)]) if wanted else None
        out: list[torch.Tensor | None] = [None] * len(items)
        offset = 0
        for idx, r in zip(order, rows):
            if r is not None:
                out[idx] = logits[offset:offset + len(r)]
                offset += len(r)
        return out

    def _prepare(self, items: list[RunItem]):
        bs = self.kv.block_size
        ids, pos, slots, rows, prefills = [], [], [], [], []
        decodes = [it for it in items if it.is_decode]
        for it in items:
            start = len(ids)
            n = len(it.token_ids)
            ids.extend(it.token_ids)
            span = range(it.start_pos, it.start_pos + n)
            pos.extend(span)
            slots.extend(it.block_table[p // bs] * bs + p % bs for p in span)
            rows.append(_logit_rows(start, n, it.logits))
            if not it.is_decode:
                prefills.append(PrefillSegment(
                    start, n, it.start_pos + n, torch.tensor(it.block_table, dtype=torch.int64)))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            num_decode=len(decodes),
            decode_block_tables=_pad_tables([d.block_table for d in decodes]),
            decode_context_lens=torch.tensor([d.start_pos + 1 for d in decodes], dtype=torch.int32),
            prefills=prefills,
        )
        return torch.tensor(ids), torch.tensor(pos), meta, rows


def _logit_rows(start: int, n: int, which: str) -> torch.Tensor | None:
    if which == "none":
        return None
    if which == "last":
        return torch.tensor([start + n - 1])
    return torch.arange(start, start + n)


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32).reshape(len(tables), width)
