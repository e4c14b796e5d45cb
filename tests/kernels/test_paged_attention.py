"""Paged decode attention: Triton (interpreted) vs torch reference vs dense attention."""

import pytest
import torch
from kernel_cases import dense_attention, make_paged_case

from kernels import paged_decode_attention, paged_decode_attention_ref

CONTEXT_LENS = [1, 17, 45, 100]  # none a multiple of 16 or 32 but the first block

# (num_heads, num_kv_heads, head_dim, block_size): GQA ratios 1, 4 and 8
SHAPES = [
    (2, 2, 16, 16),
    (8, 2, 32, 32),
    (8, 1, 16, 16),
    (4, 1, 32, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_fp32(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(CONTEXT_LENS, num_heads, num_kv_heads, head_dim, block_size, seed=1)
    out_ref, lse_ref = paged_decode_attention(*case.args(), impl="torch")
    out, lse = paged_decode_attention(*case.args(), impl="triton")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (4, num_heads, head_dim) and lse.shape == (4, num_heads)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 2, 32, 16), (8, 1, 16, 32)])
def test_triton_matches_reference_fp16(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(CONTEXT_LENS, num_heads, num_kv_heads, head_dim, block_size,
                           dtype=torch.float16, seed=2)
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    out, lse = paged_decode_attention(*case.args(), impl="triton")
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse_ref, atol=2e-3, rtol=2e-3)


def test_triton_pads_non_power_of_two_sizes():
    case = make_paged_case([5, 30], num_heads=6, num_kv_heads=2, head_dim=24, block_size=12,
                           seed=3)
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    out, lse = paged_decode_attention(*case.args(), impl="triton")
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_triton_accepts_strided_query():
    case = make_paged_case([17, 45], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                           seed=4)
    qkv = torch.randn(2, 3 * 4, 16)  # (B, 3 * H, D), q is a strided view into it
    case.q = qkv[:, 0::3]  # (B, H, D)
    assert not case.q.is_contiguous()
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    out, lse = paged_decode_attention(*case.args(), impl="triton")
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_dense_attention(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(CONTEXT_LENS, num_heads, num_kv_heads, head_dim, block_size, seed=5)
    out_dense, lse_dense = dense_attention(case)
    out, lse = paged_decode_attention_ref(*case.args())
    torch.testing.assert_close(out.double(), out_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_single_token_context_returns_its_value_exactly(impl):
    case = make_paged_case([1], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, seed=6)
    out, lse = paged_decode_attention(*case.args(), impl=impl)
    block = int(case.block_tables[0, 0])
    expected_out = case.v_cache[block, 0].repeat_interleave(2, dim=0)  # (H, D): one value
    keys = case.k_cache[block, 0].repeat_interleave(2, dim=0)  # (H, D)
    expected_lse = (case.q[0] * keys).sum(-1) * case.scale  # (H,): lse of one score
    assert torch.equal(out[0], expected_out)  # softmax weight exactly 1
    torch.testing.assert_close(lse[0], expected_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_context_gives_zero_and_minus_inf(impl):
    case = make_paged_case([0, 17], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16,
                           seed=7)
    out, lse = paged_decode_attention(*case.args(), impl=impl)
    assert torch.equal(out[0], torch.zeros(2, 16))
    assert torch.equal(lse[0], torch.full((2,), float("-inf")))
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def test_auto_on_cpu_runs_the_reference():
    case = make_paged_case([17, 45], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16)
    out, lse = paged_decode_attention(*case.args())
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)


def test_unknown_impl_is_rejected():
    case = make_paged_case([17], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16)
    with pytest.raises(ValueError, match="impl"):
        paged_decode_attention(*case.args(), impl="cuda")


def _valid():
    return make_paged_case([17, 45], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: setattr(c, "q", c.q[0]), r"q must have shape \(B, num_heads, head_dim\)"),
        (lambda c: setattr(c, "k_cache", c.k_cache[0]), r"k_cache must have shape"),
        (lambda c: setattr(c, "k_cache", c.k_cache[..., :8]), r"k_cache head_dim 8 .* 16"),
        (lambda c: setattr(c, "v_cache", c.v_cache[..., :8]), r"v_cache must have k_cache's"),
        (lambda c: setattr(c, "q", torch.randn(2, 3, 16)), r"q num_heads 3 .* num_kv_heads 2"),
        (lambda c: setattr(c, "k_cache", c.k_cache.half()), r"k_cache dtype"),
        (lambda c: setattr(c, "block_tables", c.block_tables.long()), r"block_tables must be int32"),
        (lambda c: setattr(c, "block_tables", c.block_tables[0]), r"block_tables must have shape"),
        (lambda c: setattr(c, "context_lens", c.context_lens.long()), r"context_lens must be int32"),
        (lambda c: setattr(c, "context_lens", c.context_lens[:1]), r"context_lens must have shape"),
    ],
)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_arguments_raise_value_error(mutate, match, impl):
    case = _valid()
    mutate(case)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(*case.args(), impl=impl)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_ref(*case.args())


def test_output_only_fast_path_equals_reference():
    from kernels import paged_decode_attention_out, paged_decode_attention_ref

    gen = torch.Generator().manual_seed(7)
    kc, vc = torch.randn(40, 16, 2, 32, generator=gen), torch.randn(40, 16, 2, 32, generator=gen)
    q = torch.randn(5, 8, 32, generator=gen)
    lens = torch.tensor([1, 17, 45, 100, 33], dtype=torch.int32)
    tables = torch.stack([torch.randperm(40, generator=gen)[:7] for _ in range(5)]).int()
    ref, _ = paged_decode_attention_ref(q, kc, vc, tables, lens, 0.2)
    out = paged_decode_attention_out(q, kc, vc, tables, lens, 0.2, impl="torch")
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_contiguous_decode_attention_equals_reference(shape):
    from kernels import decode_attention

    num_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(CONTEXT_LENS, num_heads, num_kv_heads, head_dim, block_size, seed=8)
    out_ref, _ = paged_decode_attention_ref(*case.args())
    longest = max(CONTEXT_LENS)
    # a decode buffer: (slots, KVH, capacity, D) with garbage past each context
    k_buf = torch.randn(6, num_kv_heads, longest + 9, head_dim)
    v_buf = torch.randn(6, num_kv_heads, longest + 9, head_dim)
    for b, n in enumerate(CONTEXT_LENS):
        blocks = case.block_tables[b, :-(-n // block_size)].long()
        for buf, cache in ((k_buf, case.k_cache), (v_buf, case.v_cache)):
            buf[b, :, :n] = cache[blocks].flatten(0, 1)[:n].transpose(0, 1)
    beyond = torch.arange(longest)[None, :] >= torch.tensor(CONTEXT_LENS)[:, None]
    mask = torch.zeros(len(CONTEXT_LENS), 1, 1, longest).masked_fill_(
        beyond[:, None, None, :], float("-inf"))
    rows = len(CONTEXT_LENS)
    out = decode_attention(case.q, k_buf[:rows, :, :longest], v_buf[:rows, :, :longest], mask,
                           case.scale)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


def test_output_only_fast_path_ignores_nan_past_the_context():
    case = make_paged_case([5, 30], num_heads=8, num_kv_heads=2, head_dim=16, block_size=16,
                           seed=9)  # unowned slots hold NaN keys and values
    from kernels import paged_decode_attention_out

    out = paged_decode_attention_out(*case.args(), impl="torch")
    out_ref, _ = paged_decode_attention_ref(*case.args())
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_kv_equals_reference(num_splits):
    # split-KV (the GPU's choice when sequences x kv heads are few): each split walks a
    # slice of the blocks; slices past a short sequence's end are empty (out 0, lse -inf)
    from kernels.paged_attention import _paged_decode_triton

    case = make_paged_case(CONTEXT_LENS, 8, 2, 32, 16, seed=4)
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    out, lse = _paged_decode_triton(*case.args(), num_splits=num_splits)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
