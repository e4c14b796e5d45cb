"""The physical paged KV cache: one tensor, allocated once, sliced per layer.

Lifecycle: sized from a byte budget when the engine starts
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
"""

from __future__ import annotations

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
