"""Where a received layer's bytes go: straight into the reserved KV blocks.

Lifecycle of a ``LayerSink`` (one layer of one transfer attempt)::

    sink = make_sink(k_cache, v_cache, block_ids, shape, dtype)  # the layer's header
    sink.write(offset, data)   # per byte range, in any order
    sink.finish(crc32s)        # every block checked -> True when all match

The layer buffer the sender streams is (2, n, block_size, kv_heads, head_dim):
2 * n segments of one block each, which the receiver maps onto its own ids::

    offset 0           B             n*B          (n+1)*B          2*n*B
           | K ids[0]  | K ids[1] ... | V ids[0]  | V ids[1] ... |

- ``DirectSink`` (a contiguous CPU cache): each segment is copied into its
  cache block as it arrives, one copy and no second buffer. The CRC of each
  block runs over the incoming bytes while they are still in cache (ranges
  in stream order, as every backend sends them); for ranges out of order,
  ``finish`` reads the blocks back instead. A failed layer leaves garbage
  in blocks that are never admitted (the retry rewrites them, or they are
  released and the prompt recomputed).
- ``StagedSink`` (a GPU cache, or one that is not contiguous): the ranges
  fill a host buffer; ``finish`` checks it and scatters only a verified
  layer with ``scatter_kv_blocks``.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import scatter_kv_blocks
from kvtransfer import integrity
from kvtransfer.integrity import block_checksums, byte_rows, cache_block_checksums


class DirectSink:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: list[int]):
        self.rows = (byte_rows(k_cache), byte_rows(v_cache))  # (num_cache_blocks, B) each
        self.block_ids = list(block_ids)
        self._ids = np.asarray(block_ids, dtype=np.int64)  # (n,)
        self._block_bytes = self.rows[0].shape[1]  # B
        # While ranges come in stream order, each block's CRC-32 runs over the
        # incoming bytes, still in cache; ``_next`` is where the next range
        # should start, -1 once one came out of order (then ``finish`` reads
        # the blocks back instead).
        self._crc32 = [0] * len(block_ids)
        self._next = 0

    def write(self, offset: int, src: np.ndarray) -> None:
        """Copy ``src`` (uint8), bytes [offset, offset + len) of the layer buffer."""
        in_order = offset == self._next
        self._next = offset + src.size if in_order else -1
        block, n, crc = self._block_bytes, len(self.block_ids), self._crc32
        crc32, view = integrity.crc32, memoryview(src)
        while src.size:
            segment, within = divmod(offset, block)
            plane, j = divmod(segment, n)  # plane 0 keys, 1 values; j-th reserved block
            if within == 0 and src.size >= block:  # whole blocks: one fancy-indexed copy
                m = min(src.size // block, n - j)
                self.rows[plane][self._ids[j:j + m]] = src[:m * block].reshape(m, block)
                step = m * block
                if in_order:
                    for r in range(m):
                        crc[j + r] = crc32(view[r * block:(r + 1) * block], crc[j + r])
            else:  # the head or tail of a block
                step = min(block - within, src.size)
                self.rows[plane][self._ids[j], within:within + step] = src[:step]
                if in_order:
                    crc[j] = crc32(view[:step], crc[j])
            offset += step
            src, view = src[step:], view[step:]

    def finish(self, crc32s: tuple[int, ...]) -> bool:
        """Every block's CRC-32 (keys then values) matches; call once all bytes are in."""
        if self._next < 0:
            return tuple(cache_block_checksums(*self.rows, self.block_ids)) == crc32s
        return tuple(self._crc32) == crc32s


class StagedSink:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: list[int],
                 shape: tuple[int, ...], dtype: torch.dtype):
        self.k_cache, self.v_cache, self.block_ids = k_cache, v_cache, list(block_ids)
        self.buffer = torch.empty(shape, dtype=dtype)  # (2, n, block_size, kv_heads, head_dim)
        self._flat = self.buffer.view(-1).view(torch.uint8).numpy()

    def write(self, offset: int, src: np.ndarray) -> None:
        self._flat[offset:offset + src.size] = src

    def finish(self, crc32s: tuple[int, ...]) -> bool:
        if tuple(block_checksums(self.buffer)) != crc32s:
            return False
        ids = torch.tensor(self.block_ids, dtype=torch.int64, device=self.k_cache.device)
        scatter_kv_blocks(self.buffer.to(self.k_cache.device), self.k_cache, self.v_cache, ids)
        return True


LayerSink = DirectSink | StagedSink


def make_sink(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: list[int],
              shape: tuple[int, ...], dtype: torch.dtype) -> LayerSink:
    """A direct sink where the cache allows writing its blocks in place."""
    if k_cache.device.type == "cpu" and k_cache.is_contiguous() and v_cache.is_contiguous():
        return DirectSink(k_cache, v_cache, block_ids)
    return StagedSink(k_cache, v_cache, block_ids, shape, dtype)


def as_bytes(data: memoryview | bytes | torch.Tensor | np.ndarray) -> np.ndarray:
    """A byte range as a flat uint8 array, without a copy where the source allows."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)
