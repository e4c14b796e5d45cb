"""Paged decode attention: one query token per sequence against its paged KV cache.

Contract (``paged_decode_attention`` and ``paged_decode_attention_ref`` alike):

    q             (B, num_heads, head_dim)                          float dtype
    k_cache       (num_blocks, block_size, num_kv_heads, head_dim)  q's dtype
    v_cache       (num_blocks, block_size, num_kv_heads, head_dim)  q's dtype
    block_tables  (B, max_blocks_per_seq) int32; row b lists sequence b's
                  physical blocks in order; entries past its last block are
                  ignored (any value)
    context_lens  (B,) int32; tokens of sequence b = its first context_lens[b]
                  slots, >= 1 (0 is tolerated: out 0, lse -inf, i.e. an empty
                  shard for ``merge_attention_states``)
    scale         float softmax scale

    returns out (B, num_heads, head_dim) in q's dtype and
            lse (B, num_heads) float32 = logsumexp_l(scale * q . k_l) (natural
            log), so the softmax weights are exp(score - lse).

Grouped-query attention: num_heads % num_kv_heads == 0 and query head h reads
kv head h // (num_heads // num_kv_heads). Values in block_tables and
context_lens are the caller's invariant (not checked: that would synchronise
the GPU); the wrappers check ranks, shapes, dtypes and devices and raise
ValueError naming the bad argument. Strides are free (any layout).

The Triton kernel runs one program per (sequence, kv head, split): it loads
the group's query heads once and walks its slice of the sequence's blocks
with an online softmax in float32; when sequences x kv heads are too few to
fill the GPU, the blocks are split and the partial states merged by
log-sum-exp (``kernels.merge_states``). The torch reference gathers every block at once.
``impl="cpp"`` runs the C++ CPU kernel of ``kernels.cpu_kernels`` (float32,
loaded by ``kernels.cpu_kernels.load()``; ``auto`` never picks it): it reads
each sequence's blocks in place, its own context only.

``decode_attention`` is the engine's CPU decode path over a contiguous
(B, KVH, L, D) context (its decode buffer); ``paged_decode_attention_out``
gathers the paged context into that form when the buffer cannot be used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import next_power_of_2, tl, triton, use_triton
from kernels.cpu_kernels import paged_decode_attention_cpp
from kernels.merge_states import _merge_triton


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a paged KV cache; see the module docstring."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    if impl == "cpp":
        return paged_decode_attention_cpp(q, k_cache, v_cache, block_tables, context_lens, scale)
    if use_triton(impl, q, _paged_decode_kernel):
        return _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """The output only, for the engine's decode path on the paged cache: on
    CPU the C++ kernel (``impl="cpp"``) or the gathered context through
    ``decode_attention`` (no log-sum-exp is materialised); on CUDA the
    Triton kernel."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    if impl == "cpp":
        return paged_decode_attention_cpp(
            q, k_cache, v_cache, block_tables, context_lens, scale)[0]
    if use_triton(impl, q, _paged_decode_kernel):
        return _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)[0]
    k, v, valid = _gather_context(k_cache, v_cache, block_tables, context_lens)  # (B, L, KVH, D)
    mask = torch.zeros(valid.shape, dtype=k.dtype, device=k.device)  # (B, L)
    mask.masked_fill_(~valid, float("-inf"))
    out = decode_attention(q.float(), k.transpose(1, 2), v.transpose(1, 2),
                           mask[:, None, None, :], scale)  # (B, H, D)
    return out.to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against a contiguous context (plain torch:
    the CPU decode path; on CUDA the paged kernel reads the cache directly).

    q (B, H, D); k, v (B, KVH, L, D) in q's dtype, any strides with a unit
    last stride (views into a larger buffer are read in place); mask
    (B, 1, 1, L) additive (0 or -inf, every row with a 0) in q's dtype, or
    None when every position is visible. Returns (B, H, D) in q's dtype.

    The G = H / KVH query heads sharing a kv head are handed to SDPA as G
    query rows of that head (no causal mask among them): grouped-query
    attention without repeating K/V, and on CPU about twice as fast as
    ``enable_gqa`` with one row per head.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # (B, KVH, G, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, KVH, G, D)
    return out.reshape(batch, num_heads, head_dim)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference (the CPU production path): one gather, float32 math."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k, v, valid = _gather_context(k_cache, v_cache, block_tables, context_lens)  # (B, L, ...)
    qg = q.float().view(batch, num_kv_heads, group, head_dim)  # (B, KVH, G, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale  # (B, KVH, G, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))  # (B, KVH, G, L)
    lse = torch.logsumexp(scores, dim=-1)  # (B, KVH, G)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # (B, KVH, G)
    probs = torch.exp(scores - lse_safe[..., None])  # (B, KVH, G, L)
    out = torch.einsum("bkgl,blkd->bkgd", probs, v)  # (B, KVH, G, D)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype), lse.reshape(batch, num_heads)


def _gather_context(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 keys and values (B, L, KVH, D) of every sequence, and its valid slots (B, L).

    Table entries past a sequence's last block are replaced by block 0 so any
    value there is harmless, and keys and values in invalid slots are zeroed
    so stale NaN/inf in unused cache memory cannot leak through a zero softmax
    weight (or an additive -inf mask).
    """
    block_size = k_cache.shape[1]
    longest = int(context_lens.max()) if context_lens.numel() else 0
    num_blocks = min(-(-longest // block_size), block_tables.shape[1])
    used_blocks = (context_lens + block_size - 1) // block_size  # (B,)
    block_idx = torch.arange(num_blocks, device=block_tables.device)  # (NB,)
    in_use = block_idx[None, :] < used_blocks[:, None]  # (B, NB)
    ids = torch.where(in_use, block_tables[:, :num_blocks], 0).reshape(-1)  # (B * NB,)
    shape = (context_lens.shape[0], num_blocks * block_size, *k_cache.shape[2:])  # (B, L, KVH, D)
    k = k_cache.index_select(0, ids).view(shape).float()  # (B, L, KVH, D), a fresh tensor
    v = v_cache.index_select(0, ids).view(shape).float()  # (B, L, KVH, D), a fresh tensor
    positions = torch.arange(shape[1], device=k.device)  # (L,)
    valid = positions[None, :] < context_lens[:, None]  # (B, L)
    invalid = (~valid).reshape(-1).nonzero().squeeze(1)  # (n,) flat (b, l) rows
    for kv in (k, v):  # only the invalid rows are touched
        kv.view(shape[0] * shape[1], shape[2] * shape[3]).index_fill_(0, invalid, 0.0)
    return k, v, valid


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Raise ValueError naming the first argument whose rank, shape, dtype or device is wrong."""
    _check_shapes(q, k_cache, v_cache)
    _check_dtypes(q, k_cache, v_cache)
    _check_tables(q.shape[0], block_tables, context_lens)
    _check_devices(q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   context_lens=context_lens)


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must have shape (B, num_heads, head_dim), got {tuple(q.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    cache_shape = "(num_blocks, block_size, num_kv_heads, head_dim)"
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have shape {cache_shape}, got {tuple(k_cache.shape)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache head_dim {k_cache.shape[3]} must equal q head_dim {head_dim}; "
            f"expected shape {cache_shape} = (*, *, *, {head_dim})"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    num_kv_heads = k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"q num_heads {num_heads} must be a multiple of k_cache num_kv_heads {num_kv_heads}"
        )


def _check_tables(batch: int, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must have shape (B={batch}, max_blocks_per_seq), "
            f"got {tuple(block_tables.shape)}"
        )
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must have shape (B={batch},), got {tuple(context_lens.shape)}")
    if context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be int32, got {context_lens.dtype}")


def _check_dtypes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} dtype {cache.dtype} must equal q dtype {q.dtype}")


def _check_devices(q: torch.Tensor, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")


def _paged_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_paged_decode_kernel`` on a (B, num_kv_heads, splits) grid.

    With one split each program walks its sequence's whole context and
    writes the result. With several (too few sequences x kv heads to fill
    the GPU, e.g. a long context at a small batch), each program walks one
    slice of the blocks into float32 partial states, and
    ``merge_states._merge_triton`` folds them by log-sum-exp (split-KV, as
    in flash-decoding). ``num_splits`` overrides the choice (tests)."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)  # (B, H, D)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)  # (B, H)
    if batch == 0:
        return out, lse
    max_blocks = block_tables.shape[1]
    splits = num_splits or _choose_splits(batch * num_kv_heads, max_blocks, q.device)
    per_split = -(-max_blocks // splits) if max_blocks else 1
    splits = -(-max_blocks // per_split) if max_blocks else 1
    part_out, part_lse = out[None], lse[None]  # (1, B, H, D), (1, B, H): written directly
    if splits > 1:
        part_out = torch.empty(splits, *q.shape, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, batch, num_heads, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        part_out, part_lse, q, k_cache, v_cache, block_tables, context_lens, float(scale),
        per_split,
        *q.stride(), *part_out.stride(), *part_lse.stride(),
        *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), context_lens.stride(0),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
        BLOCK_SIZE=block_size, BLOCK_PAD=max(16, next_power_of_2(block_size)),
        HEAD_DIM=head_dim, HEAD_PAD=max(16, next_power_of_2(head_dim)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _merge_triton(part_out, part_lse, out=out, lse=lse)
    return out, lse


MIN_BLOCKS_PER_SPLIT = 8  # below this a split's fixed cost outweighs its parallelism
_SM_COUNT: dict[torch.device, int] = {}


def _choose_splits(programs: int, max_blocks: int, device: torch.device) -> int:
    """Enough splits for about two programs per streaming multiprocessor; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-2 * _SM_COUNT[device] // programs)
    return max(1, min(wanted, max_blocks // MIN_BLOCKS_PER_SPLIT))


@triton.jit
def _paged_decode_kernel(
    out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, scale, blocks_per_split,
    stride_qb, stride_qh, stride_qd,
    stride_os, stride_ob, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tn, stride_len,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (seq, kv_head, split): the GROUP query heads of kv_head against
    split's slice of seq's blocks (an empty slice writes out 0, lse -inf).
    Scores and values go through ``tl.dot`` (tensor cores; full float32
    precision for float32 inputs), so the pads are at least 16: padded query
    rows are computed and never stored."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, GROUP_PAD)  # (G,)
    offs_t = tl.arange(0, BLOCK_PAD)  # (T,)
    offs_d = tl.arange(0, HEAD_PAD)  # (D,)
    g_ok = offs_g < GROUP  # (G,)
    d_ok = offs_d < HEAD_DIM  # (D,)
    heads = kv_head * GROUP + offs_g  # (G,)
    q_offs = seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptr + q_offs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (G, D)
    ctx_len = tl.load(lens_ptr + seq * stride_len)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)  # (G,) running max
    l_sum = tl.zeros((GROUP_PAD,), tl.float32)  # (G,) running sum of exp
    acc = tl.zeros((GROUP_PAD, HEAD_PAD), tl.float32)  # (G, D)
    num_blocks = (ctx_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    first = split * blocks_per_split
    last = tl.minimum(num_blocks, first + blocks_per_split)
    for j in range(first, last):
        block_id = tl.load(tables_ptr + seq * stride_tb + j * stride_tn).to(tl.int64)
        t_ok = (offs_t < BLOCK_SIZE) & (j * BLOCK_SIZE + offs_t < ctx_len)  # (T,)
        kv_mask = t_ok[:, None] & d_ok[None, :]  # (T, D)
        k_offs = block_id * stride_kb + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd
        k = tl.load(k_ptr + k_offs + kv_head * stride_kh, mask=kv_mask, other=0.0)  # (T, D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G, T) float32
        scores = tl.where(t_ok[None, :], scores, float("-inf"))  # (G, T)
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # (G,)
        alpha = tl.exp(m - m_new)  # (G,)
        p = tl.exp(scores - m_new[:, None])  # (G, T)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)  # (G,)
        v_offs = block_id * stride_vb + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd
        v = tl.load(v_ptr + v_offs + kv_head * stride_vh, mask=kv_mask, other=0.0)  # (T, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    nonempty = l_sum > 0  # (G,) false only when ctx_len == 0
    out = acc / tl.where(nonempty, l_sum, 1.0)[:, None]  # (G, D)
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l_sum, 1.0)), float("-inf"))  # (G,)
    o_offs = (split * stride_os + seq * stride_ob + heads[:, None] * stride_oh
              + offs_d[None, :] * stride_od)
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split * stride_ls + seq * stride_lb + heads * stride_lh, lse, mask=g_ok)
