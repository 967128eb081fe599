"""Activation buffers on the wire: F32 as is, or Q80 blocks (f16 scale + 32 int8, ggml's Q8_0).

Q80 buffers are made by the one Q80 quantizer the kernels use (dllama.kernels.quant): one rounding rule
(C roundf, exact for every float32), so their bytes equal `dllama.quants.quantize("q80", ...)` and
`gguf.quants.quantize(..., Q8_0)`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dllama.kernels._bits import f16_to_f32
from dllama.kernels.quant import Q80_BLOCK_BYTES, _dequantize_q80, _quantize_q80, _quantize_q80_keep

# the codec calls the kernels behind the checking wrappers: its arrays are right by construction, and the
# checks cost half of a 2048-value exchange's encoding


@njit(nogil=True, cache=True)
def _add_q80(blocks, out):
    # out (n_blocks * 32,) f32 += the Q80 blocks (n_blocks * 34,) uint8: the root's sum of partials,
    # one pass and no temporary
    for b in range(out.size // 32):
        o = b * 34
        d = f16_to_f32(np.uint16(blocks[o]) | (np.uint16(blocks[o + 1]) << np.uint16(8)))
        for j in range(32):
            out[b * 32 + j] += np.float32(np.int8(blocks[o + 2 + j])) * d


def _flat(a: np.ndarray) -> bool:
    return a.flags.c_contiguous and a.dtype == np.float32


class Q80Codec:
    """Quantizes (n, cols) f32 rows into Q80 bytes and back, with scratch allocated once for max_rows."""

    def __init__(self, max_rows: int, cols: int):
        if cols % 32:
            raise ValueError(f"q80 buffers need a multiple of 32 columns, got {cols}")
        self.cols = cols
        # rows that arrive strided (a view into a wider array) are staged here
        self._scratch = np.empty((max_rows, cols), np.float32)

    def nbytes(self, n: int) -> int:
        return n * self.cols // 32 * Q80_BLOCK_BYTES

    def encode(self, x: np.ndarray, out: np.ndarray, keep: bool = False) -> memoryview:
        """x (n, cols) f32 -> out[:nbytes(n)] (uint8) as Q80 blocks; returns that part as a memoryview.
        keep: x also becomes what a receiver decodes, in the same pass (a sender that goes on with it)."""
        n = x.shape[0]
        dst = out[:self.nbytes(n)]
        if _flat(x):
            (_quantize_q80_keep if keep else _quantize_q80)(x.reshape(-1), dst)
        else:
            staged = self._scratch[:n]
            staged[...] = x
            (_quantize_q80_keep if keep else _quantize_q80)(staged.reshape(-1), dst)
            if keep:
                x[...] = staged
        return memoryview(dst)

    def decode(self, raw: np.ndarray, out: np.ndarray) -> None:
        """raw Q80 bytes of n rows -> out (n, cols) f32."""
        n = out.shape[0]
        if _flat(out):
            _dequantize_q80(raw[:self.nbytes(n)], out.reshape(-1))
            return
        tmp = self._scratch[:n]
        _dequantize_q80(raw[:self.nbytes(n)], tmp.reshape(-1))
        out[...] = tmp

    def decode_add(self, raw: np.ndarray, out: np.ndarray) -> None:
        """out (n, cols) += the Q80 rows in raw."""
        n = out.shape[0]
        if _flat(out):
            _add_q80(raw[:self.nbytes(n)], out.reshape(-1))
            return
        tmp = self._scratch[:n]
        _dequantize_q80(raw[:self.nbytes(n)], tmp.reshape(-1))
        out += tmp
