"""C++ CPU kernels for the engine's float32 forward, built on first use.

- ``paged_decode_attention_cpp``: the contract of ``paged_decode_attention``
  (``kernels.paged_attention``, whose ``impl="cpp"`` lands here): q (B, H, D),
  the paged k/v caches (num_blocks, block_size, KVH, D), block_tables
  (B, max_blocks) int32, context_lens (B,) int32; returns out (B, H, D) and
  lse (B, H). Unlike the torch reference (gather every block, then SDPA over
  the longest context with a mask), it reads each sequence's own blocks in
  place and only its ``context_lens[b]`` positions: no gathered copy, no
  padding. One task per (sequence, kv head) on torch's intra-op threads. It
  supports H / KVH in ``SUPPORTED_GROUPS`` and D in ``SUPPORTED_HEAD_DIMS``
  (``supported``).
- ``rms_norm``: x (T, d) * rsqrt(mean(x^2) + eps) * weight in one op (torch
  runs about eight on CPU); other inputs go to torch.

Sources: ``csrc/cpu_kernels.cpp``.

Lifecycle: nothing is compiled at import. ``load()`` builds the extension
with torch's C++ extension builder (a compiler and ninja are needed; about
15 s on 2 cores) the first time a process on the machine calls it, then
loads the cached build (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) in about a second; where it cannot build it
warns once and returns False. Each source file, flag set and checkout gets
its own build folder, so two checkouts never rebuild each other's, and a
build holds an OS lock (``fcntl.flock``) that dies with its process: torch's
own lock file, left behind by a builder that was killed, would otherwise
make every later ``load()`` wait forever. It builds with ``-fopenmp``, so that
``at::parallel_for`` spreads the work over torch's intra-op threads
(``parallel_threads`` says how many), or without it where OpenMP is missing.
The engine calls it when ``EngineConfig.cpu_kernels`` is set (the default)
on CPU in float32.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_GROUPS = (1, 2, 4, 8)  # query heads per kv head; keep in step with pick() in the .cpp
SUPPORTED_HEAD_DIMS = (32, 64, 128)
SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "loaded": the outcome of this process's one build/load attempt


def load() -> bool:
    """Build (first time on this machine) or load the kernels; True if usable."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _build()
        return _state["loaded"]


def is_loaded() -> bool:
    return _state.get("loaded", False)


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the attention kernel takes these inputs (it must also be loaded)."""
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32
            and q.shape[1] % k_cache.shape[2] == 0
            and q.shape[1] // k_cache.shape[2] in SUPPORTED_GROUPS
            and q.shape[2] in SUPPORTED_HEAD_DIMS)


def paged_decode_attention_cpp(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel; shapes already checked by ``paged_decode_attention``."""
    if not is_loaded():
        raise RuntimeError("impl='cpp' needs kernels.cpu_kernels.load() to have succeeded")
    if not supported(q, k_cache):
        raise ValueError(
            f"impl='cpp' takes float32 CPU tensors with H / KVH in {SUPPORTED_GROUPS} and "
            f"head_dim in {SUPPORTED_HEAD_DIMS}; got q {tuple(q.shape)} {q.dtype} on "
            f"{q.device}, k_cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    return torch.ops.baton_cpu.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, float(scale))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; one C++ op for float32 (T, d) inputs when the
    kernels are loaded, else ``F.rms_norm``."""
    if (is_loaded() and x.dim() == 2 and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and x.is_contiguous()):
        return torch.ops.baton_cpu.rms_norm(x, weight, eps)
    return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)


def parallel_threads(tasks: int = 64) -> int:
    """Threads the kernels' ``at::parallel_for`` runs ``tasks`` tasks on (1 if
    the build has no OpenMP); 0 when the kernels are not loaded."""
    return torch.ops.baton_cpu.parallel_threads(tasks) if is_loaded() else 0


@dataclass(frozen=True)
class BuildVariant:
    name: str  # torch's extension name
    cflags: list[str]
    ldflags: list[str]

    @property
    def folder(self) -> Path:
        return build_folder(self.name, self.cflags)


def build_variants() -> list[BuildVariant]:
    """What ``load()`` tries, in order: with OpenMP, then without."""
    flags, tag = ["-O3"], "generic"
    if _x86_has("avx2", "fma"):
        flags, tag = flags + ["-mavx2", "-mfma"], "avx2"
    # Without -fopenmp, at::parallel_for compiles to a plain loop: the kernels
    # would run on one thread whatever torch.get_num_threads() says. The
    # extension then binds to the OpenMP runtime torch already loaded.
    return [BuildVariant(f"baton_cpu_kernels_{tag}_omp", flags + ["-fopenmp"], ["-fopenmp"]),
            BuildVariant(f"baton_cpu_kernels_{tag}", flags, [])]


def _build() -> bool:
    from torch.utils.cpp_extension import load as load_extension

    err: Exception | None = None
    for v in build_variants():
        folder = v.folder
        try:
            with _build_lock(folder):
                load_extension(v.name, [str(SOURCE)], extra_cflags=v.cflags,
                               extra_ldflags=v.ldflags, build_directory=str(folder),
                               is_python_module=False, verbose=False)
            return True
        except Exception as exc:  # no compiler, no ninja, no OpenMP: try without, then torch
            err = exc
    warnings.warn(f"CPU decode attention kernel unavailable ({err!r:.300}); "
                  "decode attention stays on torch", RuntimeWarning, stacklevel=3)
    return False


def build_folder(name: str, flags: list[str]) -> Path:
    """Where ``name`` builds: one folder per source text, flags and source path."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    key = hashlib.sha256("\0".join([str(SOURCE), SOURCE.read_text(), *flags]).encode())
    return (Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
            / f"{name}_{key.hexdigest()[:12]}")


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` while torch builds or loads
    there. Every builder holds it, so a torch ``lock`` file found under it
    was left by a killed one: removed rather than waited on forever."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "baton.flock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _x86_has(*flags: str) -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(flag in have for flag in flags)
    except OSError:
        pass
    return False
