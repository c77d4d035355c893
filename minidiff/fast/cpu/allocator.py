"""Keep freed memory in the process between steps instead of handing it back to the OS.

NumPy allocates every array with malloc. glibc's malloc returns freed memory at the top of a heap
to the OS once more than M_TRIM_THRESHOLD is free there (by default twice its adaptive mmap
threshold, a few MB), and the next step's arrays then come from freshly mapped pages: one page
fault per 4 KB touched, which the kernel zeroes. A U-Net step allocates and frees the same
activation-sized arrays every time, so this repeats every step: 12 k page faults and about 33 ms
of system time per sampling step of `small` at 16x16 on 2 threads (docs/performance.md).

keep_freed_memory() sets two malloc parameters for the whole process:

    M_MMAP_THRESHOLD = 32 MiB     blocks below it come from the heaps (the adaptive default starts at
                                  128 KiB); 32 MiB is the most glibc accepts on 64-bit
    M_TRIM_THRESHOLD = 1 GiB      free memory at the top of a heap is kept up to this much

Peak memory is unchanged; what changes is that the process keeps its peak after a step instead of
shrinking between steps, as PyTorch's CUDA caching allocator does on a GPU. The CLI calls it
(`minidiff train / sample / eval / bench ...`): a library should not change its host's allocator,
so importing minidiff does not. Elsewhere than Linux with glibc it does nothing.

Shape legend: none; no arrays here.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Set glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD as above; True where both were accepted."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
