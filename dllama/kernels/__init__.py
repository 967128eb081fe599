"""numba kernels: packed quantized matmul, norms, RoPE, attention, activations (docs/architecture.md)."""

from dllama.kernels._threads import set_threads
from dllama.kernels.matmul import Packed, matmul, pack
from dllama.kernels.quant import dequantize_q80, quantize_q80

__all__ = ["set_threads", "Packed", "pack", "matmul", "quantize_q80", "dequantize_q80"]
