"""Choosing between a kernel's Triton and torch implementations.

Contract:
- Every public kernel wrapper takes ``impl: str = "auto"``, one of ``IMPLS``.
- ``"torch"`` always runs the plain-torch reference.
- ``"triton"`` runs the Triton kernel. On CUDA tensors this needs triton
  installed; on CPU tensors it additionally needs ``TRITON_INTERPRET=1`` in the
  environment *before* triton (and this package) is imported, because Triton
  decides at ``@triton.jit`` time whether a kernel is compiled or interpreted.
  Anything else raises ``RuntimeError`` with the reason.
- ``"auto"`` runs Triton when the input is on CUDA and triton is installed,
  otherwise torch.

Triton is imported here, guarded: ``import kernels`` works without triton.
Without it, ``triton.jit`` is an identity decorator so the kernel modules still
define (never-called) kernel functions, and ``HAS_TRITON`` is False.
"""

from __future__ import annotations

import types

import torch

IMPLS = ("auto", "triton", "torch")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=int)


def use_triton(impl: str, x: torch.Tensor, kernel: object) -> bool:
    """True to run ``kernel`` (a ``@triton.jit`` function) on ``x``, False for torch."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "auto":
        return x.is_cuda and HAS_TRITON
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package, which is not installed")
    if not x.is_cuda and not _is_interpreted(kernel):
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set in the environment "
            "before triton and the kernels package are imported"
        )
    return True


def _is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (runs on CPU)."""
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1); tl.arange sizes must be powers of two."""
    return 1 << (n - 1).bit_length()
