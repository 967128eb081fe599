"""Keeping resident memory to what a node holds: a worker its slice, the root none of the workers'.
Linux-specific and best effort: elsewhere these do nothing."""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import numpy as np

_MADV_PAGEOUT = 21   # Linux >= 5.4
_PAGE = 4096


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_pages(raw: np.ndarray) -> None:
    """Drop the pages under `raw` from this process's resident set. MADV_PAGEOUT reclaims without losing
    data whatever backs the memory: a view of a memory-mapped file is read again from the file if it is
    needed later."""
    libc = _libc()
    if libc is None or raw.nbytes < 1 << 16:
        return
    start = raw.ctypes.data // _PAGE * _PAGE
    end = -(-(raw.ctypes.data + raw.nbytes) // _PAGE) * _PAGE
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def trim_heap() -> None:
    """Give the heap's free pages back to the OS: the buffers of a slice's tensors (received, or cut by
    columns) leave holes in glibc's heaps that it keeps otherwise."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def available_bytes() -> int | None:
    """Memory this machine can give a process now without swapping (Linux MemAvailable, which counts
    reclaimable page cache; else the free pages), or None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def freeze_survivors() -> None:
    """Collect, then keep what is alive now (the loaded slice, compiled kernels, numba's and the tokenizer's
    objects: 112,000 on the 1B shape) out of every later collection. A full collection walks them all, 50 ms
    measured on a worker and on the root of the 1B shape, and one comes within the first tokens after a
    load: on a cluster a pause of one node holds up every other. `thaw` undoes it when the slice goes."""
    gc.collect()
    gc.freeze()


def thaw() -> None:
    """Let the collector see the frozen objects again (a slice being freed: its cycles must be collectable)."""
    gc.unfreeze()
