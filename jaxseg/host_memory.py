"""Host allocator settings that keep XLA:CPU's per-call buffers from being page-faulted anew.

XLA:CPU allocates an executable's temporaries with malloc at every call: about 480 MB for the
default config's train step. glibc gives each worker thread its own arena, and an arena other
than the main one serves a request over 64 MB with a fresh mmap, returned to the kernel at free.
Every step then page-faults the whole buffer again, and the kernel zeroes each page: 122,000
faults and 0.25 s of system time per step on the 2-core CI machine, one sixth of the step's CPU
time. One arena, no mmap for large blocks and no trimming keep those pages mapped and reused
(6,000 faults per step; `python -m jaxseg.bench train` measured the effect, see the README).
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """Makes glibc malloc keep and reuse freed large blocks; returns whether it applied.

    Call it before JAX starts its backend: worker threads that already hold an arena keep it.
    A no-op (False) where the C library is not glibc (macOS, musl). The process keeps its peak
    heap mapped until it exits, as a long training or evaluation would in any case.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
