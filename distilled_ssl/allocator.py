"""The process's C allocator: keep freed memory for reuse (glibc on Linux).

PyTorch's CPU tensors come from ``malloc``. glibc serves a large block (over 128 KiB at first) with a
fresh ``mmap`` and gives it back to the operating system when it is freed, so a loop that allocates
the same large temporaries at every step (the inner steps of trajectory matching: activations,
their gradients and second-order terms, tens of MiB each) page-faults and zeroes all of them again
at every step. :func:`reuse_freed_memory` raises glibc's mmap and trim thresholds so that freed
blocks stay in the process and are reused: the same numbers, without the page faults
(``benchmarks/distill_step.py``, the "malloc" rows). The process's resident memory then stays at
its peak instead of falling back between steps.

It changes a process-wide setting, so the library calls it only where it runs the process
(:func:`~distilled_ssl.pipeline.set_allocator`, from ``prepare_run`` and the ``evaluate`` command)
when ``reuse_freed_memory`` is set (the default) and the run is on the CPU. It is the runtime form of
the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int: blocks up to 2 GiB come from the heap and stay there


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process for reuse; ``True`` where it was applied,
    ``False`` where the C library is not glibc (macOS, Windows, musl): nothing is changed there."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
