"""Builders shared by the kernel tests: paged caches with shuffled block tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    """Inputs of one paged decode attention call."""

    q: torch.Tensor  # (B, H, D)
    k_cache: torch.Tensor  # (num_blocks, block_size, KVH, D)
    v_cache: torch.Tensor  # (num_blocks, block_size, KVH, D)
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32
    context_lens: torch.Tensor  # (B,) int32
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens,
                self.scale)


def make_paged_case(
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedCase:
    """Random q and cache; each sequence owns shuffled, non-adjacent blocks.

    Unused table entries hold out-of-range garbage and every slot no sequence
    owns holds NaN, so a kernel that reads past a context shows up as NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)  # (num_blocks,) physical ids
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.full((len(context_lens), max_blocks), 10**6, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    start = 0
    for b, (n_tokens, n_blocks) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        ids = order[start:start + n_blocks]
        start += n_blocks
        tables[b, :n_blocks] = ids.int()
        slots = torch.arange(n_blocks * block_size) < n_tokens  # (n_blocks * T,)
        for kv in (k_cache, v_cache):
            fresh = torch.randn(n_blocks * block_size, num_kv_heads, head_dim, generator=gen)
            fresh[~slots] = float("nan")
            kv[ids] = fresh.view(n_blocks, block_size, num_kv_heads, head_dim)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen)
    return PagedCase(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables,
                     torch.tensor(context_lens, dtype=torch.int32), head_dim**-0.5)


def dense_attention(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 attention: per sequence and head, explicit softmax over all keys."""
    batch, num_heads, head_dim = case.q.shape
    block_size, num_kv_heads = case.k_cache.shape[1], case.k_cache.shape[2]
    group = num_heads // num_kv_heads
    outs = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    lses = torch.zeros(batch, num_heads, dtype=torch.float64)
    for b in range(batch):
        n_tokens = int(case.context_lens[b])
        n_blocks = -(-n_tokens // block_size)
        ids = case.block_tables[b, :n_blocks].long()
        keys = case.k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:n_tokens].double()
        values = case.v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:n_tokens].double()
        for h in range(num_heads):
            scores = keys[:, h // group] @ case.q[b, h].double() * case.scale  # (L,)
            top = scores.max()
            weights = torch.exp(scores - top)  # (L,)
            lses[b, h] = top + torch.log(weights.sum())
            outs[b, h] = (weights / weights.sum()) @ values[:, h // group]  # (D,)
    return outs, lses


def shard_bounds(num_blocks: int, num_shards: int) -> list[int]:
    """Block boundaries of num_shards contiguous shards; shard 0 is empty when num_shards >= 3."""
    if num_shards < 3:
        return [round(i * num_blocks / num_shards) for i in range(num_shards + 1)]
    rest = num_shards - 1
    return [0] + [round(i * num_blocks / rest) for i in range(rest + 1)]


def shard_case(case: PagedCase, num_shards: int, shard: int) -> PagedCase:
    """The same queries against only the blocks of one shard of every sequence's context."""
    block_size = case.k_cache.shape[1]
    tables = torch.zeros_like(case.block_tables)
    lens = torch.zeros_like(case.context_lens)
    for b, n_tokens in enumerate(case.context_lens.tolist()):
        bounds = shard_bounds(-(-n_tokens // block_size), num_shards)
        first, last = bounds[shard], bounds[shard + 1]
        tables[b, :last - first] = case.block_tables[b, first:last]
        lens[b] = max(0, min(n_tokens - first * block_size, (last - first) * block_size))
    return PagedCase(case.q, case.k_cache, case.v_cache, tables, lens, case.scale)
