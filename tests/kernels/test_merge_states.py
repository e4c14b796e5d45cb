"""Merging attention states: sharded attention merged by lse equals full attention."""

import math

import pytest
import torch
from kernel_cases import make_paged_case, shard_case

from kernels import (
    merge_attention_states,
    merge_attention_states_ref,
    paged_decode_attention_ref,
)

IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_merged_shards_equal_full_attention(num_shards, impl):
    case = make_paged_case([45, 100, 17], num_heads=8, num_kv_heads=2, head_dim=16,
                           block_size=16, seed=10)
    full_out, full_lse = paged_decode_attention_ref(*case.args())
    parts = [paged_decode_attention_ref(*shard_case(case, num_shards, s).args())
             for s in range(num_shards)]
    outs = torch.stack([out for out, _ in parts])  # (P, B, H, D)
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H)
    if num_shards >= 3:
        assert torch.isinf(lses[0]).all()  # shard 0 is empty for every sequence
    out, lse = merge_attention_states(outs, lses, impl=impl)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_shard_is_returned_unchanged(impl):
    gen = torch.Generator().manual_seed(11)
    outs = torch.randn(1, 2, 3, 16, generator=gen)  # (P, B, H, D)
    lses = torch.randn(1, 2, 3, generator=gen)  # (P, B, H)
    out, lse = merge_attention_states(outs, lses, impl=impl)
    assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_two_equal_shards_add_log_two(impl):
    outs = torch.full((2, 1, 1, 4), 0.5)  # (P, B, H, D)
    lses = torch.full((2, 1, 1), 1.25)  # (P, B, H)
    out, lse = merge_attention_states(outs, lses, impl=impl)
    assert torch.equal(out, torch.full((1, 1, 4), 0.5))
    torch.testing.assert_close(lse, torch.full((1, 1), 1.25 + math.log(2)))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_shard_is_ignored_even_if_its_out_is_nan(impl):
    gen = torch.Generator().manual_seed(12)
    outs = torch.randn(3, 2, 2, 16, generator=gen)  # (P, B, H, D)
    lses = torch.randn(3, 2, 2, generator=gen)  # (P, B, H)
    outs[1] = float("nan")
    lses[1] = float("-inf")
    out, lse = merge_attention_states(outs, lses, impl=impl)
    expected_out, expected_lse = merge_attention_states_ref(outs[[0, 2]], lses[[0, 2]])
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_empty_gives_zero_and_minus_inf(impl):
    outs = torch.full((3, 2, 2, 8), float("nan"))  # (P, B, H, D)
    lses = torch.full((3, 2, 2), float("-inf"))  # (P, B, H)
    out, lse = merge_attention_states(outs, lses, impl=impl)
    assert torch.equal(out, torch.zeros(2, 2, 8))
    assert torch.equal(lse, torch.full((2, 2), float("-inf")))


def test_triton_matches_reference_fp16_and_odd_head_dim():
    gen = torch.Generator().manual_seed(13)
    outs = torch.randn(4, 2, 3, 24, generator=gen).half()  # (P, B, H, D)
    lses = torch.randn(4, 2, 3, generator=gen) * 5  # (P, B, H)
    out_ref, lse_ref = merge_attention_states_ref(outs, lses)
    out, lse = merge_attention_states(outs, lses, impl="triton")
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("outs", "lses", "match"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), r"outs must have shape \(P >= 1, B, H, D\)"),
        (torch.zeros(0, 1, 3, 4), torch.zeros(0, 1, 3), r"outs must have shape"),
        (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 4), r"lses must have shape \(P, B, H\)"),
        (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3).half(), r"lses must be float32"),
        (torch.zeros(2, 1, 3, 4, dtype=torch.int32), torch.zeros(2, 1, 3), r"outs must be a"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise_value_error(outs, lses, match, impl):
    with pytest.raises(ValueError, match=match):
        merge_attention_states(outs, lses, impl=impl)
