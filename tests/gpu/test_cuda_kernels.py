"""The Triton kernels compiled for the GPU against their torch references,
on CUDA tensors: the same cases as the interpreter tests, in fp32, fp16 and
bf16 (bf16 math is only trustworthy compiled, not interpreted)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_paged_case

from kernels import (
    gather_kv_blocks,
    gather_kv_blocks_ref,
    merge_attention_states,
    merge_attention_states_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    scatter_kv_blocks,
)

CUDA = torch.device("cuda")
# (context lengths, heads, kv heads, head dim, block size): GQA 1/4/8, blocks 16/32,
# contexts not a multiple of the block size, one long context
SHAPES = [
    ([1, 17, 100, 33], 4, 4, 64, 16),
    ([5, 64, 257], 8, 2, 64, 32),
    ([300, 31, 2048], 32, 4, 128, 16),
    ([129, 1000], 16, 2, 128, 32),
]
# half precision: the softmax weights are rounded to the input dtype before they meet V
# (as in flash attention), hence more than one rounding of the output
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _on_cuda(case):
    case.q, case.k_cache, case.v_cache = (t.to(CUDA) for t in (case.q, case.k_cache, case.v_cache))
    case.block_tables, case.context_lens = case.block_tables.to(CUDA), case.context_lens.to(CUDA)
    return case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_paged_decode_triton_equals_reference(shape, dtype):
    lens, heads, kv_heads, dim, block = shape
    case = _on_cuda(make_paged_case(lens, heads, kv_heads, dim, block, dtype=dtype))
    out, lse = paged_decode_attention(*case.args(), impl="triton")
    ref_out, ref_lse = paged_decode_attention_ref(*case.args())
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_equals_reference(num_splits):
    from kernels.paged_attention import _paged_decode_triton

    case = _on_cuda(make_paged_case([700, 33, 1500], 16, 2, 128, 16, dtype=torch.float16))
    out, lse = _paged_decode_triton(*case.args(), num_splits=num_splits)
    ref_out, ref_lse = paged_decode_attention_ref(*case.args())
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_auto_picks_triton_on_cuda(monkeypatch):
    import kernels.paged_attention as pa

    calls = []
    real = pa._paged_decode_triton
    monkeypatch.setattr(pa, "_paged_decode_triton",
                        lambda *a: calls.append(1) or real(*a))
    case = _on_cuda(make_paged_case([40, 9], 8, 2, 64, 16))
    paged_decode_attention(*case.args())
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merging_partial_states_equals_full_attention(dtype):
    case = _on_cuda(make_paged_case([96, 80], 8, 2, 64, 16, dtype=dtype))
    full, _ = paged_decode_attention_ref(*case.args())
    # split each sequence's blocks into two shards: first 3 blocks, the rest
    first = case.context_lens.clamp(max=48)
    rest_tables = case.block_tables[:, 3:]
    parts = [paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                    first, case.scale, impl="triton"),
             paged_decode_attention(case.q, case.k_cache, case.v_cache, rest_tables,
                                    case.context_lens - first, case.scale, impl="triton")]
    outs = torch.stack([p[0] for p in parts])
    lses = torch.stack([p[1] for p in parts])
    merged, _ = merge_attention_states(outs, lses, impl="triton")
    ref, _ = merge_attention_states_ref(outs, lses)
    torch.testing.assert_close(merged.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(merged.float(), full.float(), atol=5 * TOL[dtype],
                               rtol=5 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_then_scatter_round_trips_bit_exactly(dtype):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(64, 16, 4, 64, generator=gen).to(dtype).to(CUDA)
    v = torch.randn(64, 16, 4, 64, generator=gen).to(dtype).to(CUDA)
    src = torch.tensor([5, 60, 2, 33, 17], device=CUDA)
    buf = gather_kv_blocks(k, v, src, impl="triton")
    assert torch.equal(buf, gather_kv_blocks_ref(k, v, src))
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
    dst = torch.tensor([0, 9, 63, 40, 1], device=CUDA)
    scatter_kv_blocks(buf, k2, v2, dst, impl="triton")
    assert torch.equal(k2[dst], k[src]) and torch.equal(v2[dst], v[src])
    others = torch.ones(64, dtype=torch.bool, device=CUDA)
    others[dst] = False
    assert k2[others].abs().sum() == 0 and v2[others].abs().sum() == 0
