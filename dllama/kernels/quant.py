"""Q80 blocks: the network buffers, and the int8 activations that block-quantized weights multiply.

Q80 byte layout (ggml Q8_0), 34 bytes per block of 32 values, blocks one after another::

    offset 0   uint16  d      IEEE half, little-endian: the block scale, max|x| / 127
    offset 2   int8    qs[32] value j is qs[j] * d

Rounding is ggml's `roundf` (half away from zero) with the scale computed in float32, so the bytes
equal ggml's and the `gguf` package's `quantize(..., Q8_0)`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dllama.kernels._bits import _as_f32, _as_u32, f16_to_f32, f32_to_f16
from dllama.quants import QUANTS

# the numba bodies below spell it as the literal 34 (numba freezes globals); this checks their callers
Q80_BLOCK_BYTES = QUANTS["q80"].type_size


@njit(inline="always", nogil=True, cache=True)
def _roundf(v):
    # ggml/gguf roundf: floor(|v|) + floor(2 * frac), signed; exact for every float32 (no v + 0.5).
    a = abs(v)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return r if v >= np.float32(0.0) else -r


@njit(inline="always", nogil=True, cache=True)
def _q80_blocks(x, out, keep):
    # x (n_blocks * 32,) f32 -> out (n_blocks * 34,) uint8; keep (a constant at each caller): x also
    # becomes what _dequantize_q80 makes of out (the same operations, so the same bits)
    for b in range(x.size // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        h = f32_to_f16(d)
        d16 = f16_to_f32(h)
        o = b * 34
        out[o] = np.uint8(h & np.uint16(0xFF))
        out[o + 1] = np.uint8(h >> np.uint16(8))
        for j in range(32):
            q = np.int32(_roundf(x[b * 32 + j] * inv))
            out[o + 2 + j] = np.uint8(q & 0xFF)
            if keep:
                x[b * 32 + j] = np.float32(np.int8(q)) * d16


@njit(nogil=True, cache=True)
def _quantize_q80(x, out):
    _q80_blocks(x, out, False)


@njit(nogil=True, cache=True)
def _quantize_q80_keep(x, out):
    # a sender that must go on with the values its receivers get, in one pass instead of two
    _q80_blocks(x, out, True)


@njit(nogil=True, cache=True)
def _dequantize_q80(blocks, out):
    # blocks (n_blocks * 34,) uint8 -> out (n_blocks * 32,) f32
    for b in range(out.size // 32):
        o = b * 34
        d = f16_to_f32(np.uint16(blocks[o]) | (np.uint16(blocks[o + 1]) << np.uint16(8)))
        for j in range(32):
            out[b * 32 + j] = np.float32(np.int8(blocks[o + 2 + j])) * d


def _check(x, blocks):
    if x.dtype != np.float32 or blocks.dtype != np.uint8:
        raise ValueError(f"Q80 wants float32 values and uint8 blocks, got {x.dtype} and {blocks.dtype}")
    if not (x.flags.c_contiguous and blocks.flags.c_contiguous):
        raise ValueError("Q80 (de)quantization wants C-contiguous arrays")
    if x.size % 32 or blocks.size != x.size // 32 * Q80_BLOCK_BYTES:
        raise ValueError(f"Q80: {x.size} values need {x.size // 32 * Q80_BLOCK_BYTES} block bytes "
                         f"(values a multiple of 32), got {blocks.size}")


def quantize_q80(x, out_blocks):
    """x (any shape, size a multiple of 32) f32 -> out_blocks (size // 32 * 34,) uint8, in place.

    Raises ValueError on a wrong dtype, size or layout.
    """
    _check(x, out_blocks)
    _quantize_q80(x.reshape(-1), out_blocks.reshape(-1))


def dequantize_q80(blocks, out):
    """blocks (n * 34,) uint8 -> out (any shape, size n * 32) f32, in place. Raises ValueError."""
    _check(out, blocks)
    _dequantize_q80(blocks.reshape(-1), out.reshape(-1))


@njit(nogil=True, cache=True)
def quantize_act(x, xq, xd, xs):
    """Activations for block-quantized weights: x (n, cols) f32 -> per block of 32,
    xq (>=n, cols) int8, scale xd (>=n, cols//32) f32 and xs = xd * sum(xq) (the term that
    weight offsets multiply: Q40's -8, Q41's m). The scale stays float32 (more exact than
    ggml's f16); rounding is ggml's."""
    n, cols = x.shape
    for i in range(n):
        for b in range(cols // 32):
            # max |x| on the bits: a non-negative float orders as its bits do, and an integer maximum
            # vectorises where a float one (NaN rules) does not
            abits = np.uint32(0)
            for j in range(32):
                abits = max(abits, _as_u32(x[i, b * 32 + j]) & np.uint32(0x7FFFFFFF))
            amax = _as_f32(abits)
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            s = np.int32(0)
            for j in range(32):
                q = np.int32(_roundf(x[i, b * 32 + j] * inv))
                xq[i, b * 32 + j] = np.int8(q)
                s = np.int32(s + q)   # |s| <= 32 x 127: 32-bit lanes, not numba's 64-bit sum
            xd[i, b] = d
            xs[i, b] = d * np.float32(s)
