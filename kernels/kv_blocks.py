"""Gathering KV blocks into, and scattering them out of, one contiguous buffer.

Used by KV transfer: the sender gathers a layer's blocks into a buffer that
goes over the wire as raw bytes; the receiver scatters it into its own blocks.

Contract (the wrappers and the ``_ref`` functions alike), for ONE layer:

    k_cache, v_cache  (num_blocks, block_size, num_kv_heads, head_dim), same
                      shape, dtype and device; any strides
    block_ids         (n,) int32 or int64, values in [0, num_blocks)
                      (not checked: that would synchronise the GPU)

    gather_kv_blocks  -> buffer (2, n, block_size, num_kv_heads, head_dim),
                         contiguous, cache dtype; buffer[0][i] = k_cache[block_ids[i]],
                         buffer[1][i] = v_cache[block_ids[i]]
    scatter_kv_blocks(buffer, ...) -> None; the inverse, in place:
                         k_cache[block_ids[i]] = buffer[0][i], likewise v;
                         blocks not named are untouched; block_ids must not
                         repeat (which copy wins would be unspecified)

Both are pure copies, so gather then scatter round-trips bit-exactly in every
dtype. Bad ranks, shapes, dtypes or devices raise ValueError naming the
argument. The Triton kernel runs one program per (block, chunk of the block's
elements) and handles any strides on both sides.
"""

from __future__ import annotations

import torch

from kernels._dispatch import tl, triton, use_triton

_CHUNK = 1024  # elements copied by one Triton program


def gather_kv_blocks(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """Copy the named blocks of one layer into a new (2, n, block_size, KVH, D) buffer."""
    _check_caches(k_cache, v_cache, block_ids)
    if not use_triton(impl, k_cache, _copy_blocks_kernel):
        return gather_kv_blocks_ref(k_cache, v_cache, block_ids)
    buffer = k_cache.new_empty((2, block_ids.shape[0], *k_cache.shape[1:]))  # (2, n, T, KVH, D)
    _launch_copy(k_cache, buffer[0], block_ids, to_buffer=True)
    _launch_copy(v_cache, buffer[1], block_ids, to_buffer=True)
    return buffer


def scatter_kv_blocks(
    buffer: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    impl: str = "auto",
) -> None:
    """Write buffer[0][i] / buffer[1][i] into block block_ids[i] of k_cache / v_cache."""
    _check_caches(k_cache, v_cache, block_ids)
    _check_buffer(buffer, k_cache, block_ids)
    if not use_triton(impl, k_cache, _copy_blocks_kernel):
        return scatter_kv_blocks_ref(buffer, k_cache, v_cache, block_ids)
    _launch_copy(k_cache, buffer[0], block_ids, to_buffer=False)
    _launch_copy(v_cache, buffer[1], block_ids, to_buffer=False)
    return None


def gather_kv_blocks_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> torch.Tensor:
    """Plain-torch reference of ``gather_kv_blocks``."""
    _check_caches(k_cache, v_cache, block_ids)
    ids = block_ids.long()  # (n,)
    buffer = k_cache.new_empty((2, ids.shape[0], *k_cache.shape[1:]))  # (2, n, T, KVH, D)
    torch.index_select(k_cache, 0, ids, out=buffer[0])  # (n, T, KVH, D)
    torch.index_select(v_cache, 0, ids, out=buffer[1])  # (n, T, KVH, D)
    return buffer


def scatter_kv_blocks_ref(
    buffer: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """Plain-torch reference of ``scatter_kv_blocks``."""
    _check_caches(k_cache, v_cache, block_ids)
    _check_buffer(buffer, k_cache, block_ids)
    ids = block_ids.long()  # (n,)
    k_cache.index_copy_(0, ids, buffer[0])  # (n, T, KVH, D) into (num_blocks, T, KVH, D)
    v_cache.index_copy_(0, ids, buffer[1])  # (n, T, KVH, D) into (num_blocks, T, KVH, D)


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Raise ValueError naming the cache or block_ids argument that is malformed."""
    if k_cache.dim() != 4:
        raise ValueError(
            "k_cache must have shape (num_blocks, block_size, num_kv_heads, head_dim), "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(
            f"v_cache must match k_cache's dtype {k_cache.dtype} and device {k_cache.device}, "
            f"got {v_cache.dtype} on {v_cache.device}"
        )
    if block_ids.dim() != 1:
        raise ValueError(f"block_ids must have shape (n,), got {tuple(block_ids.shape)}")
    if block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids must be int32 or int64, got {block_ids.dtype}")
    if block_ids.device != k_cache.device:
        raise ValueError(f"block_ids is on {block_ids.device} but k_cache is on {k_cache.device}")


def _check_buffer(buffer: torch.Tensor, k_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Raise ValueError unless buffer is (2, n, block_size, KVH, D) in the caches' dtype."""
    expected = (2, block_ids.shape[0], *k_cache.shape[1:])
    if tuple(buffer.shape) != expected:
        raise ValueError(
            f"buffer must have shape (2, n, block_size, num_kv_heads, head_dim) = {expected}, "
            f"got {tuple(buffer.shape)}"
        )
    if buffer.dtype != k_cache.dtype or buffer.device != k_cache.device:
        raise ValueError(
            f"buffer must match k_cache's dtype {k_cache.dtype} and device {k_cache.device}, "
            f"got {buffer.dtype} on {buffer.device}"
        )


def _launch_copy(
    cache: torch.Tensor, buffer: torch.Tensor, block_ids: torch.Tensor, *, to_buffer: bool
) -> None:
    """Copy between cache blocks and buffer (n, T, KVH, D) on an (n, chunks) grid."""
    block_numel = cache[0].numel()
    if block_ids.shape[0] == 0 or block_numel == 0:
        return
    grid = (block_ids.shape[0], triton.cdiv(block_numel, _CHUNK))
    _copy_blocks_kernel[grid](
        cache, buffer, block_ids, block_ids.stride(0), *cache.stride(), *buffer.stride(),
        NUM_KV_HEADS=cache.shape[2], HEAD_DIM=cache.shape[3],
        BLOCK_NUMEL=block_numel, CHUNK=_CHUNK, TO_BUFFER=to_buffer,
    )


@triton.jit
def _copy_blocks_kernel(
    cache_ptr, buf_ptr, ids_ptr, stride_ids,
    stride_cb, stride_ct, stride_ch, stride_cd,
    stride_bn, stride_bt, stride_bh, stride_bd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, TO_BUFFER: tl.constexpr,
):
    """Program (i, c): chunk c of block block_ids[i], cache <-> buffer[i]."""
    i = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    block_id = tl.load(ids_ptr + i * stride_ids).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)  # (CHUNK,) flat index in (T, KVH, D)
    ok = offs < BLOCK_NUMEL  # (CHUNK,)
    t = offs // (NUM_KV_HEADS * HEAD_DIM)  # (CHUNK,)
    h = (offs // HEAD_DIM) % NUM_KV_HEADS  # (CHUNK,)
    d = offs % HEAD_DIM  # (CHUNK,)
    cache_offs = block_id * stride_cb + t * stride_ct + h * stride_ch + d * stride_cd
    buf_offs = i * stride_bn + t * stride_bt + h * stride_bh + d * stride_bd
    if TO_BUFFER:
        tl.store(buf_ptr + buf_offs, tl.load(cache_ptr + cache_offs, mask=ok), mask=ok)
    else:
        tl.store(cache_ptr + cache_offs, tl.load(buf_ptr + buf_offs, mask=ok), mask=ok)
