"""How the process hands freed memory back to the system (glibc's allocator; a no-op elsewhere).

lrc allocates many arrays of 1-100 MB one after another (a unit's weight and factors, a batch's
activations, ONNX Runtime's tensors). glibc raises its mmap threshold each time such a block is
freed, so later ones come from the heap, which does not shrink while anything above them lives:
on SmolLM2's update the heap kept ~300 MB of freed blocks resident (benchmarks/memory.py).
:func:`prefer_mmap` fixes the threshold at 1 MiB, so every large block is its own mapping and is
returned when freed; :func:`trim` gives back what the heap has free now.

:func:`quiet_blas` is the same kind of process setting for CPU time: OpenBLAS's worker threads
spin for ~2^28 cycles after each numpy call before they sleep, and lrc alternates numpy with
ONNX Runtime, whose threads then share the cores with spinning ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def prefer_mmap(threshold: int = 1 << 20) -> bool:
    """Serve blocks of ``threshold`` bytes and more by their own mappings (fixed threshold:
    glibc then stops raising it). True when the allocator took it."""
    libc = _libc()
    fn = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(fn and fn(_M_MMAP_THRESHOLD, int(threshold)))


def quiet_blas(exponent: int = 4) -> bool:
    """Let OpenBLAS's idle threads sleep after ``2**exponent`` cycles instead of ``2**28``
    (``OPENBLAS_THREAD_TIMEOUT``, read once when OpenBLAS loads: so only before numpy is
    imported, and never over a value the user set). On SmolLM2's update at 4096 calibration
    tokens (2 cores) the forward passes took 34 s with the default against 22.5 s with it, and
    the factorisations 52 s against 42 s (one run each, by hand). True when it was set."""
    if "numpy" in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(int(exponent))
    return True


def trim() -> None:
    """Return the heap's free memory to the system now (glibc ``malloc_trim``)."""
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None) if libc is not None else None
    if fn:
        fn(0)


__all__ = ["prefer_mmap", "quiet_blas", "trim"]
