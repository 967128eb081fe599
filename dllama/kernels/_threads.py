"""How many threads the kernels use: one flag the Python-side dispatchers read on every call."""

from __future__ import annotations

import threading

import numba

# True when more than one thread: dispatchers pick the parallel (prange) compiled variant.
PARALLEL = False
N = 1
# The count this Python thread last gave numba (numba keeps one per thread): asking numba costs ~6 us,
# reading this ~50 ns, and a token makes ~100 kernel calls.
_applied = threading.local()


def use_parallel():
    """True when the parallel variant should run; also applies the thread count to the calling
    thread, because numba keeps it per thread (an engine may run in a server's worker thread)."""
    if PARALLEL:
        apply()
    return PARALLEL


def apply():
    """Give the calling thread the count set_threads chose, whatever it is (for a kernel whose parallel
    variant runs at every count, see _attention): numba keeps one per thread, NUMBA_NUM_THREADS by default."""
    if getattr(_applied, "n", 0) != N:
        numba.set_num_threads(N)
        _applied.n = N


def set_threads(n):
    """Use `n` threads in every parallel kernel (1 = the serial variants, no thread wake-ups; attention
    runs its one parallel variant on one thread).

    Raises DllamaError when n is below 1 or above what numba was started with (NUMBA_NUM_THREADS).
    """
    from dllama.errors import DllamaError

    global PARALLEL, N
    limit = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, int) or n < 1 or n > limit:
        raise DllamaError(f"--nthreads {n}: must be between 1 and {limit} (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)
    _applied.n = N = n
    PARALLEL = n > 1
