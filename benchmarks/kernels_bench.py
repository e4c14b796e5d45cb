"""Micro-benchmarks of the kernels package: Triton (CUDA) or C++ (CPU) against the torch reference.

Usage::

    python benchmarks/kernels_bench.py                     # CUDA if present, else CPU
    python benchmarks/kernels_bench.py --device cuda --dtypes float16,bfloat16 --json out.json
    python benchmarks/kernels_bench.py --device cpu --shapes 2 --threads 1,2

Per (kernel, shape, dtype, impl): median time per call and the effective
bandwidth of the bytes the call must move at least (KV read once for decode
attention; partial states read once and the output written for the merge;
blocks read and written once for gather and scatter). On CUDA both
implementations are timed with ``triton.testing.do_bench`` (CUDA events, L2
flushed between calls, median), each over its own rotation of input sets
larger than L2, and the Triton output is checked against the reference
before it is timed; the table gives Triton's speed-up over torch. On CPU
Triton is interpreted (a correctness tool, not a speed one): the torch
references run, and for float32 paged decode attention the C++ kernel of
``kernels.cpu_kernels`` beside them (checked the same way), timed by the wall
clock at each of ``--threads`` intra-op thread counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_common import machine

from kernels import (
    cpu_kernels,
    gather_kv_blocks,
    merge_attention_states,
    paged_decode_attention,
    scatter_kv_blocks,
)

# (batch, num_heads, num_kv_heads, head_dim, block_size, context_len)
PAGED_SHAPES = [
    (32, 8, 2, 32, 16, 192),  # the tiny model's heads, batch 32
    (8, 8, 2, 64, 16, 512),  # llama-60m-like, short context
    (32, 32, 8, 128, 16, 2048),  # Llama-3-8B heads, batch 32
    (64, 32, 8, 128, 16, 4096),  # Llama-3-8B heads, large batch
    (4, 64, 8, 128, 32, 32768),  # Llama-3-70B heads (one TP=1 shard), long context
]
L2_BYTES = 64 << 20  # more than any GPU's L2 here: rotate input sets past it


def time_ms(fn: Callable[[], object], device: str, iters: int) -> float:
    """Median milliseconds per call."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(iters, 50), return_mode="median"))
    times = []
    for i in range(iters + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rotating(make: Callable[[], tuple], nbytes: int, device: str) -> Callable[[], tuple]:
    """A function returning the next of enough input sets to exceed L2 on CUDA."""
    sets = [make() for _ in range(max(1, -(-2 * L2_BYTES // max(nbytes, 1))) if
                                  device.startswith("cuda") else 1)]
    state = {"i": 0}

    def nxt() -> tuple:
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]
    return nxt


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


def cases(shape: tuple, device: str, dtype: torch.dtype) -> list[tuple]:
    """(name, make inputs, call(inputs, impl), bytes moved, check) per kernel."""
    batch, heads, _, head_dim, _, _ = shape
    probe = paged_inputs(shape, device, dtype)
    kv_bytes = 2 * probe[1].numel() * probe[1].element_size()
    half = probe[1].shape[0] // 2

    def merge_inputs():
        return (torch.randn(4, batch, heads, head_dim, device=device, dtype=dtype),
                torch.randn(4, batch, heads, device=device))

    def block_ids(n_blocks: int) -> torch.Tensor:
        return torch.randperm(n_blocks, device=device)[:half]

    def gather_inputs():
        q, k, v, *_ = paged_inputs(shape, device, dtype)
        return k, v, block_ids(k.shape[0])

    def scatter_inputs():
        k, v, ids = gather_inputs()
        return gather_kv_blocks(k, v, ids, impl="torch"), k, v, ids

    merge_bytes = 5 * batch * heads * head_dim * probe[0].element_size()
    return [
        ("paged_decode_attention", lambda: paged_inputs(shape, device, dtype),
         lambda a, impl: paged_decode_attention(*a, impl=impl), kv_bytes, True),
        ("merge_attention_states", merge_inputs,
         lambda a, impl: merge_attention_states(*a, impl=impl), merge_bytes, True),
        ("gather_kv_blocks", gather_inputs,
         lambda a, impl: gather_kv_blocks(*a, impl=impl), kv_bytes, True),
        ("scatter_kv_blocks", scatter_inputs,
         lambda a, impl: scatter_kv_blocks(*a, impl=impl), kv_bytes, False),
    ]


def check(name: str, got, ref) -> float:
    """Largest absolute difference between the fast and the torch outputs."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for g, r in zip(got, ref):
        diff = (g.float() - r.float()).abs().max().item()
        if diff != diff:  # NaN
            raise RuntimeError(f"{name}: NaN in the fast output")
        worst = max(worst, diff)
    return worst


def fast_impl(device: str, kernel: str, dtype: torch.dtype) -> str | None:
    """The implementation timed against torch: Triton on CUDA, the C++ kernel
    for float32 paged decode attention on CPU (where it builds)."""
    if device.startswith("cuda"):
        return "triton"
    if kernel == "paged_decode_attention" and dtype == torch.float32 and cpu_kernels.load():
        return "cpp"
    return None


def bench(device: str, dtypes: list[str], iters: int, shapes: list[tuple],
          threads: list[int | None]) -> list[dict]:
    rows = []
    for n_threads in threads:
        if n_threads:
            torch.set_num_threads(n_threads)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for shape in shapes:
                for name, make, call, nbytes, checked in cases(shape, device, dtype):
                    rows.append(bench_case(device, iters, shape, dtype, name, make, call,
                                           nbytes, checked))
                    print(line(rows[-1]), flush=True)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


def bench_case(device, iters, shape, dtype, name, make, call, nbytes, checked) -> dict:
    fast = fast_impl(device, name, dtype)
    row = {"kernel": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
           "threads": torch.get_num_threads(), "fast": fast}
    if checked and fast:
        a = make()
        row["max_abs_diff"] = check(name, call(a, fast), call(a, "torch"))
    for impl in ([fast] if fast else []) + ["torch"]:
        nxt = rotating(make, nbytes, device)
        ms = time_ms(lambda c=call, n=nxt, i=impl: c(n(), i), device, iters)
        row[f"{impl}_ms"] = ms
        row[f"{impl}_gb_s"] = nbytes / ms / 1e6
    if fast:
        row["speedup"] = row["torch_ms"] / row[f"{fast}_ms"]
    return row


def line(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    out = f"{r['kernel']:24s} {shape:22s} {r['dtype']:9s} {r['threads']:>2} thr"
    if r["fast"]:
        f = r["fast"]
        out += f" {f:6s} {r[f + '_ms']:8.3f} ms {r[f + '_gb_s']:7.0f} GB/s |"
    out += f" torch {r['torch_ms']:8.3f} ms {r['torch_gb_s']:7.0f} GB/s"
    if "speedup" in r:
        out += f" | {r['speedup']:5.2f}x"
    if "max_abs_diff" in r:
        out += f" | diff {r['max_abs_diff']:.1e}"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float16,bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--iters", type=int, default=20,
                        help="CPU: timed calls; CUDA: do_bench repetition time in ms (>= 50)")
    parser.add_argument("--shapes", type=int, default=len(PAGED_SHAPES),
                        help="use the first N shapes (CPU: the long ones are slow)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated intra-op thread counts to time at "
                             "(default: torch's setting)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    cuda = args.device.startswith("cuda")
    dtypes = (args.dtypes or ("float16,bfloat16" if cuda else "float32")).split(",")
    print(f"# {machine(args.device)}; shapes are batch x heads x kv_heads x head_dim x "
          f"block_size x context", flush=True)
    rows = bench(args.device, dtypes, args.iters, PAGED_SHAPES[:args.shapes], threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "kernels", "machine": machine(args.device),
                       "command": "python benchmarks/kernels_bench.py " + " ".join(
                           sys.argv[1:] if argv is None else argv),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
