"""Micro-benchmarks of the kernels package: median wall time per call.

Usage: python benchmarks/kernels_bench.py [--device cpu|cuda] [--iters N]

On CPU it times the torch references (the production CPU path); on CUDA it
times both the Triton kernels and the references. Prints one line per
(kernel, shape, impl): median milliseconds and effective GB/s of KV read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from kernels import gather_kv_blocks, merge_attention_states, paged_decode_attention

# (batch, num_heads, num_kv_heads, head_dim, block_size, context_len)
PAGED_SHAPES = [(8, 8, 2, 64, 16, 512), (32, 32, 8, 128, 16, 2048)]


def median_ms(fn: Callable[[], object], device: str, iters: int) -> float:
    """Median wall time of fn in milliseconds, after two warm-up calls."""
    times = []
    for i in range(iters + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def paged_inputs(shape: tuple, device: str, dtype: torch.dtype) -> tuple:
    batch, heads, kv_heads, head_dim, block_size, ctx = shape
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = batch * blocks_per_seq
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)  # (B, H, D)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)  # (NB, T, KVH, D)
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), ctx - 3, device=device, dtype=torch.int32)  # (B,)
    return q, k, v, tables, lens, head_dim**-0.5


def report(name: str, shape: tuple, impl: str, ms: float, nbytes: int) -> None:
    print(f"{name:24s} {str(shape):34s} {impl:6s} {ms:9.3f} ms {nbytes / ms / 1e6:8.1f} GB/s")


def bench(device: str, iters: int) -> None:
    dtype = torch.float16 if device == "cuda" else torch.float32
    impls = ["triton", "torch"] if device == "cuda" else ["torch"]
    for shape in PAGED_SHAPES:
        args = paged_inputs(shape, device, dtype)
        k_cache, v_cache = args[1], args[2]
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        outs = torch.randn(4, shape[0], shape[1], shape[3], device=device, dtype=dtype)
        lses = torch.randn(4, shape[0], shape[1], device=device)  # (P, B, H)
        ids = torch.randperm(k_cache.shape[0], device=device)[: k_cache.shape[0] // 2]
        cases = [
            ("paged_decode_attention", partial(paged_decode_attention, *args), kv_bytes),
            ("merge_attention_states", partial(merge_attention_states, outs, lses),
             outs.numel() * outs.element_size()),
            ("gather_kv_blocks", partial(gather_kv_blocks, k_cache, v_cache, ids), kv_bytes // 2),
        ]
        for name, fn, nbytes in cases:
            for impl in impls:
                ms = median_ms(partial(fn, impl=impl), device, iters)
                report(name, shape, impl, ms, nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    bench(args.device, args.iters)


if __name__ == "__main__":
    main()
