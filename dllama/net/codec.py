"""Activation buffers on the wire: F32 as is, or Q80 blocks (f16 scale + 32 int8, ggml's Q8_0)."""

from __future__ import annotations

import numpy as np

try:  # numba kernels: no temporaries on the per-token path
    from numba import njit

    from dllama.kernels import dequantize_q80, quantize_q80, quant as _quant
    from dllama.kernels._bits import f16_to_f32
except ImportError:  # pragma: no cover - the numpy path below gives the same bytes
    _k_quantize = _k_dequantize = _k_add = None
else:
    # the kernels behind the checking wrappers, where they exist: the codec's arrays are right by
    # construction, and the checks cost half of a 2048-value exchange's encoding
    _k_quantize = getattr(_quant, "_quantize_q80", quantize_q80)
    _k_dequantize = getattr(_quant, "_dequantize_q80", dequantize_q80)

    @njit(nogil=True, cache=True)
    def _k_add(blocks, out):
        # out (n_blocks * 32,) f32 += the Q80 blocks (n_blocks * 34,) uint8: the root's sum of partials,
        # one pass and no temporary
        for b in range(out.size // 32):
            o = b * 34
            d = f16_to_f32(np.uint16(blocks[o]) | (np.uint16(blocks[o + 1]) << np.uint16(8)))
            for j in range(32):
                out[b * 32 + j] += np.float32(np.int8(blocks[o + 2 + j])) * d

Q80_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def _roundf(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    # C roundf (half away from zero), as ggml and gguf.quants round: np.rint alone rounds half to even
    np.abs(x, out=out)
    out += 0.5
    np.floor(out, out=out)
    np.copysign(out, x, out=out)
    return out


class Q80Codec:
    """Quantizes (n, cols) f32 rows into Q80 bytes and back, with scratch allocated once for max_rows."""

    def __init__(self, max_rows: int, cols: int):
        if cols % 32:
            raise ValueError(f"q80 buffers need a multiple of 32 columns, got {cols}")
        self.cols = cols
        nb = max_rows * cols // 32
        self._scaled = np.empty((nb, 32), np.float32)
        self._rounded = np.empty((nb, 32), np.float32)
        self._amax = np.empty((nb, 1), np.float32)
        self._d = np.empty((nb, 1), np.float32)

    def nbytes(self, n: int) -> int:
        return n * self.cols // 32 * Q80_BLOCK.itemsize

    def encode(self, x: np.ndarray, out: np.ndarray) -> memoryview:
        """x (n, cols) f32 -> out[:nbytes(n)] (uint8) as Q80 blocks; returns that part as a memoryview."""
        nb = x.shape[0] * self.cols // 32
        if _k_quantize is not None and x.flags.c_contiguous:
            _k_quantize(x.reshape(-1), out[:nb * Q80_BLOCK.itemsize])
            return memoryview(out[:nb * Q80_BLOCK.itemsize])
        blocks = x.reshape(nb, 32)
        amax, d = self._amax[:nb], self._d[:nb]
        np.max(np.abs(blocks, out=self._scaled[:nb]), axis=1, keepdims=True, out=amax)
        np.divide(amax, 127, out=d)
        # 1/d where d != 0, else 0 (an all-zero block)
        np.divide(1.0, d, out=amax, where=d != 0)
        amax[d == 0] = 0
        scaled = np.multiply(blocks, amax, out=self._scaled[:nb])
        q = _roundf(scaled, self._rounded[:nb])
        dst = out[:nb * Q80_BLOCK.itemsize].view(Q80_BLOCK)
        dst["d"] = d[:, 0]
        dst["qs"] = q
        return memoryview(out[:nb * Q80_BLOCK.itemsize])

    def decode(self, raw: np.ndarray, out: np.ndarray) -> None:
        """raw Q80 bytes of n rows -> out (n, cols) f32."""
        nb = out.shape[0] * self.cols // 32
        if _k_dequantize is not None and out.flags.c_contiguous:
            _k_dequantize(raw[:nb * Q80_BLOCK.itemsize], out.reshape(-1))
            return
        src = raw[:nb * Q80_BLOCK.itemsize].view(Q80_BLOCK)
        dst = out.reshape(nb, 32)
        np.multiply(src["qs"], src["d"][:, None], out=dst, dtype=np.float32)

    def decode_add(self, raw: np.ndarray, out: np.ndarray) -> None:
        """out (n, cols) += the Q80 rows in raw."""
        nb = out.shape[0] * self.cols // 32
        if _k_add is not None and out.flags.c_contiguous:
            _k_add(raw[:nb * Q80_BLOCK.itemsize], out.reshape(-1))
            return
        tmp = self._scaled[:nb]
        self.decode(raw, tmp.reshape(out.shape[0], self.cols))
        out.reshape(nb, 32)[...] += tmp
