"""numba kernels: packed quantized matmul, norms, RoPE, attention, activations (docs/architecture.md).

Every kernel takes float32 C-contiguous arrays and writes into output arrays it is given.
"""

from dllama.kernels._threads import set_threads
from dllama.kernels.attention import attention
from dllama.kernels.matmul import TILE, Packed, matmul, pack
from dllama.kernels.ops import gelu_glu, rmsnorm, rope, rope_tables, softmax, swiglu
from dllama.kernels.quant import Q80_BLOCK_BYTES, dequantize_q80, quantize_q80

__all__ = ["set_threads", "Packed", "pack", "matmul", "TILE", "rmsnorm", "rope_tables", "rope", "attention",
           "swiglu", "gelu_glu", "softmax", "quantize_q80", "dequantize_q80", "Q80_BLOCK_BYTES"]
