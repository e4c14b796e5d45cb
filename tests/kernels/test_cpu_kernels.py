"""The C++ CPU kernels against torch: paged decode attention (``impl="cpp"``)
against the reference and float64 dense attention, RMSNorm against
``F.rms_norm``. Built once per machine (cached); skipped where they cannot be
built."""

import pytest
import torch
from kernel_cases import dense_attention, make_paged_case

from kernels import (
    cpu_kernels,
    paged_decode_attention,
    paged_decode_attention_out,
    paged_decode_attention_ref,
)

CONTEXT_LENS = [0, 1, 7, 17, 45, 100]  # empty, a single key, partial and full blocks

# (num_heads, num_kv_heads, head_dim, block_size): every supported group size and head_dim
SHAPES = [
    (2, 2, 32, 16),
    (8, 2, 32, 16),
    (8, 4, 64, 8),
    (8, 1, 128, 32),
    (16, 2, 64, 4),
]


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu_kernels.load():
        pytest.skip("the C++ kernel cannot be built here (no compiler or ninja)")


@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_reference_and_dense_attention(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(CONTEXT_LENS, num_heads, num_kv_heads, head_dim, block_size, seed=11)
    out, lse = paged_decode_attention(*case.args(), impl="cpp")
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    torch.testing.assert_close(out, out_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=2e-6, rtol=1e-5)
    case = make_paged_case(CONTEXT_LENS[1:], num_heads, num_kv_heads, head_dim, block_size,
                           seed=12)  # dense_attention needs a key per sequence
    out, lse = paged_decode_attention(*case.args(), impl="cpp")
    out_dense, lse_dense = dense_attention(case)
    torch.testing.assert_close(out.double(), out_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_dense, atol=1e-5, rtol=1e-5)


def test_empty_context_gives_zero_and_minus_inf():
    case = make_paged_case([0, 17], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
                           seed=12)
    out, lse = paged_decode_attention(*case.args(), impl="cpp")
    assert torch.equal(out[0], torch.zeros(8, 32))
    assert torch.equal(lse[0], torch.full((8,), float("-inf")))


def test_strided_query_and_output_only_path():
    case = make_paged_case([17, 45, 3], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
                           seed=13)
    qkv = torch.randn(3, 12, 32)  # (B, H + 2 KVH, D): q is a view, as in the model
    case.q = qkv[:, :8]
    out = paged_decode_attention_out(*case.args(), impl="cpp")
    out_ref, _ = paged_decode_attention_ref(*case.args())
    torch.testing.assert_close(out, out_ref, atol=2e-6, rtol=1e-5)


def test_auto_never_picks_the_kernel():
    case = make_paged_case([17, 45], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16)
    out, lse = paged_decode_attention(*case.args())
    out_ref, lse_ref = paged_decode_attention_ref(*case.args())
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (lambda: make_paged_case([5], 6, 2, 32, 16), r"H / KVH in"),  # group of 3
        (lambda: make_paged_case([5], 8, 2, 16, 16), r"head_dim in"),
        (lambda: make_paged_case([5], 8, 2, 32, 16, dtype=torch.float16), r"float32"),
    ],
)
def test_unsupported_inputs_raise_value_error(case, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(*case().args(), impl="cpp")


def test_out_of_range_block_ids_are_refused():
    case = make_paged_case([17], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16)
    case.block_tables[0, 1] = case.k_cache.shape[0]  # one past the last block
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\]"):
        paged_decode_attention(*case.args(), impl="cpp")


@pytest.mark.parametrize("shape", [(1, 256), (33, 256), (200, 100)])  # 100: not a multiple of 8
def test_rms_norm_matches_torch(shape):
    gen = torch.Generator().manual_seed(14)
    x, w = 3 * torch.randn(shape, generator=gen), torch.randn(shape[-1], generator=gen)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5),
                               torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5),
                               atol=1e-5, rtol=1e-5)


def test_rms_norm_leaves_other_inputs_to_torch():
    gen = torch.Generator().manual_seed(15)
    x, w = torch.randn(4, 6, 32, generator=gen), torch.randn(32, generator=gen)
    ref = torch.nn.functional.rms_norm(x, (32,), w, 1e-5)
    assert torch.equal(cpu_kernels.rms_norm(x, w, 1e-5), ref)  # 3-D
    assert torch.equal(cpu_kernels.rms_norm(x[:, 0], w, 1e-5), ref[:, 0])  # strided


def test_kernels_run_on_torch_intra_op_threads():
    """A build without OpenMP would run every kernel on one thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_kernels.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert cpu_kernels.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)


def test_a_lock_left_by_a_killed_build_does_not_stall_the_next_load():
    """torch's build lock is a plain file: a builder killed mid-build (a Ray
    worker torn down) leaves it, and torch alone would wait on it forever."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    folder = next(v.folder for v in cpu_kernels.build_variants() if v.folder.is_dir())
    (folder / "lock").touch()
    code = "from kernels import cpu_kernels as k; print(k.load())"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    assert not (folder / "lock").exists()
