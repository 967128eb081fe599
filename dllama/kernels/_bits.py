"""Bit-level helpers for numba kernels: f16 <-> f32 without numba float16 support.

numba has no float16 type on the CPU, and ggml stores every block scale as IEEE half. These helpers
reinterpret bits through LLVM bitcasts (no memory round trip), so loops over scales still vectorise.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _as_f32(typingctx, u):
    """The float32 whose bits are the uint32 `u`."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _as_u32(typingctx, f):
    """The uint32 holding the bits of the float32 `f`."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always", nogil=True, cache=True)
def f16_to_f32(h):
    """IEEE half bits (uint16) -> float32; exact for zero, subnormals and normals.

    Moving the 15 exponent+mantissa bits into float32 position gives a float whose exponent is
    off by the bias difference (127 - 15); one multiply by 2**112 fixes normals and subnormals
    alike. Inf/NaN come out as large finite numbers: weights and block scales never hold them.
    """
    h32 = np.uint32(h)
    u = np.uint32(((h32 & np.uint32(0x8000)) << np.uint32(16)) | ((h32 & np.uint32(0x7FFF)) << np.uint32(13)))
    return _as_f32(u) * np.float32(5.192296858534828e33)


@njit(inline="always", nogil=True, cache=True)
def f32_to_f16(f):
    """float32 -> IEEE half bits (uint16), round to nearest even, like numpy's astype(float16).

    After F. Giesen's float_to_half_fast3_rtne: subnormal results are rounded by letting the FPU
    add a magic number; normal results by adding a bias that carries into the exponent.
    """
    u = _as_u32(np.float32(f))
    sign = np.uint32(u & np.uint32(0x80000000))
    u = np.uint32(u ^ sign)
    if u >= np.uint32(0x47800000):  # too big for half: inf, or NaN stays NaN
        o = np.uint32(0x7E00) if u > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif u < np.uint32(0x38800000):  # half subnormal or zero
        v = _as_f32(u) + _as_f32(np.uint32(0x3F000000))
        o = np.uint32(_as_u32(v) - np.uint32(0x3F000000))
    else:
        mant_odd = np.uint32((u >> np.uint32(13)) & np.uint32(1))
        u = np.uint32(u + np.uint32(0xC8000FFF))  # rebias exponent (15 - 127) and round half up...
        u = np.uint32(u + mant_odd)  # ...then ties to even
        o = np.uint32(u >> np.uint32(13))
    return np.uint16(o | (sign >> np.uint32(16)))
