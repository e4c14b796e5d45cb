"""GPU tests: the engine, the Triton kernels (compiled, not interpreted) and
the gRPC KV transport with caches in CUDA memory.

They skip on a machine without CUDA (CI) and when the Triton kernels were
decorated under ``TRITON_INTERPRET=1`` (the rest of the suite sets it): run
them on a GPU machine as their own session::

    TRITON_INTERPRET=0 python -m pytest tests/gpu -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent.parent
for helpers in ("kernels", "workers", "kvtransfer"):  # kernel_cases, hf_fixtures, test_transports
    if str(TESTS / helpers) not in sys.path:
        sys.path.insert(0, str(TESTS / helpers))


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.skip(reason=reason))


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from kernels._dispatch import HAS_TRITON, _is_interpreted
    from kernels.paged_attention import _paged_decode_kernel

    if not HAS_TRITON:
        return "triton is not installed"
    if _is_interpreted(_paged_decode_kernel):
        return "Triton kernels are interpreted here; run with TRITON_INTERPRET=0"
    return None
