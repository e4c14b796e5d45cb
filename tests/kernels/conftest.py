"""Kernel tests run the Triton kernels in the interpreter, on CPU tensors.

TRITON_INTERPRET must be in the environment before triton decorates the
kernels (i.e. before ``kernels`` is first imported), hence the first lines.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

if "kernels" in sys.modules:  # imported earlier in this session, maybe compiled mode
    from kernels._dispatch import _is_interpreted  # noqa: E402
    from kernels.paged_attention import _paged_decode_kernel  # noqa: E402

    if not _is_interpreted(_paged_decode_kernel):
        raise RuntimeError(
            "kernels was imported before TRITON_INTERPRET=1 was set; set it in the "
            "environment or in tests/conftest.py so the Triton kernels run on CPU"
        )
