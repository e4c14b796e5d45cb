"""CUDA graphs of the decode-only forward pass (GPU engines).

A decode step of a small model is bound by the host: launching a few
hundred kernels one by one costs more than running them. ``DecodeGraphs``
records the whole forward pass of a decode-only batch once per padded batch
size (1, 2, 4, 8, 16, 24, 32, ...) and then replays it: one launch per step.

Lifecycle: built by the model runner on CUDA (``EngineConfig.cuda_graphs``).
``run(items)`` copies the step's token ids, positions, cache slots, block
tables and context lengths into static device buffers (through pinned host
buffers, two copies), captures the graph of that batch size the first time
it is needed, replays it and returns the logits of the real rows. Rows
padding the batch up to the graph's size decode token 0 at position 0 into
a null slot (the cache block past the block manager's, never handed out)
with a context of one token, so they touch no sequence's KV.

Block tables have a fixed width (the model's longest context in blocks):
steps whose tables would exceed ``MAX_TABLE_ENTRIES`` run eagerly. The
logits returned are views of a static buffer, valid until the next step.
"""

from __future__ import annotations

import torch

from workers.model import AttentionMetadata, LlamaForCausalLM

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_TABLE_ENTRIES = 1 << 21  # graph batch x table width; past it, eager


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, layer_caches: list, null_block: int,
                 block_size: int, max_model_len: int, max_batch: int):
        self.model, self.layer_caches = model, layer_caches
        self.null_block, self.block_size = null_block, block_size
        self.width = -(-max_model_len // block_size)  # block table entries per row
        allowed = [s for s in BATCH_SIZES if s * self.width <= MAX_TABLE_ENTRIES]
        last = next((i for i, s in enumerate(allowed) if s >= max_batch), len(allowed) - 1)
        self.sizes = allowed[:last + 1]  # graph batch sizes, the last covering max_batch
        self.max_batch = self.sizes[-1] if self.sizes else 0
        device = model.embed.weight.device
        n, w = self.max_batch, self.width
        # int64: token ids, positions, slots; int32: block tables then context lengths
        self.host64 = torch.zeros(3 * n, dtype=torch.int64, pin_memory=True)
        self.host32 = torch.zeros(n * w + n, dtype=torch.int32, pin_memory=True)
        self.dev64 = torch.zeros(3 * n, dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(n * w + n, dtype=torch.int32, device=device)
        self._h64, self._h32 = self.host64.numpy(), self.host32.numpy()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        self._copied = torch.cuda.Event()  # the last copies out of the pinned buffers

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def run(self, token_ids: list[int], positions: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Logits (B, V) float32 of B decode rows (views of a static buffer)."""
        batch = len(token_ids)
        size = next(s for s in self.sizes if s >= batch)
        self._copied.synchronize()  # the previous step's copies have read the host buffers
        self._fill(token_ids, positions, tables, size)
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        self._copied.record()
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        graph.replay()
        self.replays += 1
        return logits[:batch]

    def _fill(self, token_ids: list[int], positions: list[int], tables: list[list[int]],
              size: int) -> None:
        n, w, bs, batch = self.max_batch, self.width, self.block_size, len(token_ids)
        h64, h32 = self._h64, self._h32
        h64[:batch] = token_ids
        h64[n:n + batch] = positions
        h64[2 * n:2 * n + batch] = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        h32[n * w:n * w + batch] = [p + 1 for p in positions]
        for row, table in enumerate(tables):
            h32[row * w:row * w + len(table)] = table
        pad = slice(batch, size)  # rows that only fill the graph
        h64[pad] = 0
        h64[n + batch:n + size] = 0
        h64[2 * n + batch:2 * n + size] = self.null_block * bs
        h32[n * w + batch:n * w + size] = 1
        h32[batch * w:size * w:w] = self.null_block

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        n, w = self.max_batch, self.width
        meta = AttentionMetadata(
            slot_mapping=self.dev64[2 * n:2 * n + size], num_decode=size,
            decode_block_tables=self.dev32[:n * w].view(n, w)[:size],
            decode_context_lens=self.dev32[n * w:n * w + size], prefills=[])
        return self.dev64[:size], self.dev64[n:n + size], meta

    def _forward(self, size: int) -> torch.Tensor:
        ids, pos, meta = self._views(size)
        return self.model.compute_logits(self.model(ids, pos, meta, self.layer_caches))

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, allocator settles
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(size)
        return graph, logits

