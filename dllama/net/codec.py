"""Activation buffers on the wire: F32 as is, or Q80 blocks (f16 scale + 32 int8, ggml's Q8_0).

Q80 buffers are made by the one Q80 quantizer the kernels use (dllama.kernels.quant): one rounding rule
(C roundf, exact for every float32), so their bytes equal `dllama.quants.quantize("q80", ...)` and
`gguf.quants.quantize(..., Q8_0)`.
"""

from __future__ import annotations

import numpy as np

from dllama.kernels import Q80_BLOCK_BYTES, dequantize_q80, quantize_q80


class Q80Codec:
    """Quantizes (n, cols) f32 rows into Q80 bytes and back, with scratch allocated once for max_rows."""

    def __init__(self, max_rows: int, cols: int):
        if cols % 32:
            raise ValueError(f"q80 buffers need a multiple of 32 columns, got {cols}")
        self.cols = cols
        # rows that arrive strided (a view into a wider array) or to be added are staged here
        self._scratch = np.empty((max_rows, cols), np.float32)

    def nbytes(self, n: int) -> int:
        return n * self.cols // 32 * Q80_BLOCK_BYTES

    def encode(self, x: np.ndarray, out: np.ndarray) -> memoryview:
        """x (n, cols) f32 -> out[:nbytes(n)] (uint8) as Q80 blocks; returns that part as a memoryview."""
        n = x.shape[0]
        if not (x.flags.c_contiguous and x.dtype == np.float32):
            staged = self._scratch[:n]
            staged[...] = x
            x = staged
        dst = out[:self.nbytes(n)]
        quantize_q80(x, dst)
        return memoryview(dst)

    def decode(self, raw: np.ndarray, out: np.ndarray) -> None:
        """raw Q80 bytes of n rows -> out (n, cols) f32."""
        n = out.shape[0]
        if out.flags.c_contiguous and out.dtype == np.float32:
            dequantize_q80(raw[:self.nbytes(n)], out)
            return
        tmp = self._scratch[:n]
        dequantize_q80(raw[:self.nbytes(n)], tmp)
        out[...] = tmp

    def decode_add(self, raw: np.ndarray, out: np.ndarray) -> None:
        """out (n, cols) += the Q80 rows in raw."""
        tmp = self._scratch[:out.shape[0]]
        dequantize_q80(raw[:self.nbytes(out.shape[0])], tmp)
        out += tmp
