"""numba kernels: packed quantized matmul, norms, RoPE, attention, activations (docs/architecture.md).

Every kernel takes float32 C-contiguous arrays and writes into output arrays it is given (other
layouts work but make numba compile a slower variant on first use).
"""

import os

# Parallel kernels run on numba's OpenMP pool, and a token makes ~100 short parallel calls, so how idle
# threads wait decides the speed at 2+ threads. Measured on SmolLM2, 2 threads, 2-core host (tok/s):
#   wait policy            quiet host   one core busy with another process
#   spin forever (ACTIVE)     273            72
#   spin 1000, then sleep     264            73
#   sleep at once (PASSIVE)    99           128
# With the multiply-add kernels a parallel region is short enough that a 1000-spin wait falls asleep between
# regions of one token: the 1B shape at 2 threads (AVX2 build) ran 23.5 tok/s spinning 1000, 36.3 spinning
# 100000 (well under a millisecond), 32.9 spinning forever. A spin that outlasts the gaps inside a token but
# not the wait for the next one keeps the speed on a dedicated node (the cluster case) without burning a
# core while a worker waits on the network. On a shared host, OMP_WAIT_POLICY=passive (or fewer threads)
# is better. Either variable set by the user wins; they must be set before OpenMP starts.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "100000"

import numpy as np  # noqa: E402

from dllama.kernels._threads import set_threads  # noqa: E402
from dllama.kernels._attention import attention  # noqa: E402
from dllama.kernels._matmul import TILE, Packed, matmul  # noqa: E402
from dllama.kernels._kquant import pack  # noqa: E402
from dllama.quants import quant, row_bytes  # noqa: E402
from dllama.kernels.ops import gelu_glu, rmsnorm, rope, rope_qkv, rope_tables, softmax, swiglu  # noqa: E402
from dllama.kernels.quant import Q80_BLOCK_BYTES, dequantize_q80, quantize_q80  # noqa: E402

__all__ = ["set_threads", "Packed", "pack", "matmul", "TILE", "rmsnorm", "rope_tables", "rope", "rope_qkv", "attention",
           "swiglu", "gelu_glu", "softmax", "quantize_q80", "dequantize_q80", "Q80_BLOCK_BYTES", "warmup"]


def warmup(qtypes=("q40", "q41", "q80", "f16")):
    """Compile (or load from numba's cache) every kernel the engine calls, for the weight types
    given and the current set_threads() choice, so the first token is not slow.

    A fresh process takes ~0.5 s with a warm NUMBA_CACHE_DIR, tens of seconds without.
    """
    for qtype in qtypes:
        cols = max(32, quant(qtype).block_size)
        W = pack(qtype, np.zeros(row_bytes(qtype, cols), np.uint8), 1, cols)
        for n in (1, 2):
            matmul(W, np.zeros((n, cols), np.float32), np.zeros((n, 1), np.float32))
    # the same array types the engine passes: 2-D C-contiguous float32, int64 positions
    x = np.ones((1, 64), np.float32)
    out = np.empty_like(x)
    half = np.ones((1, 32), np.float32)
    rmsnorm(x, np.ones(64, np.float32), 1e-5, out)
    positions = np.zeros(1, np.int64)
    rope(x, positions, half, half, 64, False)
    # the glue after a fused qkv matmul reads column slices: contiguous for one token, strided for a batch
    qkv, cache, tables = np.zeros((2, 192), np.float32), np.zeros((2, 64), np.float32), np.ones((2, 32), np.float32)
    for rows in (qkv[:1], qkv):
        rope_qkv(rows[:, :64], rows[:, 64:128], rows[:, 128:], np.arange(len(rows), dtype=np.int64), tables, tables,
                 64, False, np.empty((len(rows), 64), np.float32), cache, cache)
    attention(x, x, x, positions, 1, 1, 64, np.empty((1, 1), np.float32), out)
    swiglu(x, 32, half)
    gelu_glu(x, 32, half)
    softmax(np.ones(8, np.float32))
    quantize_q80(x, np.empty(2 * Q80_BLOCK_BYTES, np.uint8))
    dequantize_q80(np.zeros(2 * Q80_BLOCK_BYTES, np.uint8), x)
