"""Block formats: whole tensors quantized and dequantized (conversion, loading, tests), in numpy except
Q80 quantization, which is the kernels' own (one rounding rule for files, activations and the wire).

The types dllama writes hold 32 values per block and are byte-identical to ggml's:

    q40  (ggml Q4_0, 18 bytes): f16 d, 16 bytes of nibbles; low nibble of byte j = value j,
         high nibble = value j+16; value = (q - 8) * d
    q41  (ggml Q4_1, 20 bytes): f16 d, f16 m, 16 bytes of nibbles (same order); value = q * d + m
    q80  (ggml Q8_0, 34 bytes): f16 d, 32 int8; value = q * d
    f16, f32: plain little-endian floats

Quantization follows ggml's reference algorithms (`quantize_row_q4_0_ref` & co.), so the bytes equal
`gguf.quants.quantize`'s; tests/unit/test_quants.py holds us to that. Rows are quantized one after
another: a row of `cols` values is `cols // 32` blocks, so `cols` must be a multiple of 32.

GGUF files bring more types that dllama reads but never writes (`read_only`): the K-quants q2k..q6k
(256-value super-blocks), q50, q51 and bf16; their layouts and dequantizers are in dllama.kquants.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dllama.errors import DllamaError


@dataclass(frozen=True)
class QuantType:
    """One weight type: the registry below is the only place its sizes and codes are written."""

    name: str                      # dllama's name, as flags and the wire spell it
    gguf: GGMLQuantizationType     # the GGUF tensor type
    dlm_code: int | None           # its value of the `.m` weight_type key (None: `.m` cannot hold it)
    wire_code: int                 # its byte in a WEIGHT frame (docs/protocol.md)
    read_only: bool = False        # read from GGUF files only: no quantizer, dequantized by dllama.kquants

    @property
    def block_size(self) -> int:
        """Values per block (1 for plain floats)."""
        return GGML_QUANT_SIZES[self.gguf][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.gguf][1]

    @property
    def is_block(self) -> bool:
        return self.block_size > 1


_T = GGMLQuantizationType
QUANTS = {q.name: q for q in (
    QuantType("f32", _T.F32, dlm_code=0, wire_code=0),
    QuantType("f16", _T.F16, dlm_code=1, wire_code=1),
    QuantType("q40", _T.Q4_0, dlm_code=2, wire_code=2),
    QuantType("q41", _T.Q4_1, dlm_code=None, wire_code=3),
    QuantType("q80", _T.Q8_0, dlm_code=3, wire_code=4),
    QuantType("q2k", _T.Q2_K, dlm_code=None, wire_code=5, read_only=True),
    QuantType("q3k", _T.Q3_K, dlm_code=None, wire_code=6, read_only=True),
    QuantType("q4k", _T.Q4_K, dlm_code=None, wire_code=7, read_only=True),
    QuantType("q5k", _T.Q5_K, dlm_code=None, wire_code=8, read_only=True),
    QuantType("q6k", _T.Q6_K, dlm_code=None, wire_code=9, read_only=True),
    QuantType("q50", _T.Q5_0, dlm_code=None, wire_code=10, read_only=True),
    QuantType("q51", _T.Q5_1, dlm_code=None, wire_code=11, read_only=True),
    QuantType("bf16", _T.BF16, dlm_code=None, wire_code=12, read_only=True),
)}
QTYPES = tuple(QUANTS)
# the types dllama writes and its own kernels take as they are
BLOCK_BYTES = {q.name: q.type_size for q in QUANTS.values() if q.is_block and not q.read_only}
ELEMENT_BYTES = {q.name: q.type_size for q in QUANTS.values() if not q.is_block and not q.read_only}
BLOCK_SIZE = 32   # the written block types': the smallest block a column split must not cut
assert {QUANTS[q].block_size for q in BLOCK_BYTES} == {BLOCK_SIZE}
assert all(q.block_size % BLOCK_SIZE == 0 for q in QUANTS.values() if q.is_block)
BY_GGUF = {q.gguf: q.name for q in QUANTS.values()}
BY_DLM_CODE = {q.dlm_code: q.name for q in QUANTS.values() if q.dlm_code is not None}
BY_WIRE_CODE = {q.wire_code: q.name for q in QUANTS.values()}


def quant(qtype: str) -> QuantType:
    """The registry entry of `qtype`. Raises DllamaError for an unknown type."""
    q = QUANTS.get(qtype)
    if q is None:
        raise DllamaError(f"unknown weight type {qtype!r} (expected one of {', '.join(QTYPES)})")
    return q

# Rows per numpy pass: large enough to amortise numpy's per-call cost, small enough that the
# float32 temporaries of one pass (a few MB) stay in cache and bounded in RAM.
_CHUNK_VALUES = 1 << 20


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values. Raises DllamaError for an unknown type or a bad width."""
    q = quant(qtype)
    if cols % q.block_size:
        raise DllamaError(f"a {qtype} row needs a multiple of {q.block_size} values, got {cols}")
    return cols // q.block_size * q.type_size


def tensor_bytes(qtype: str, shape: tuple) -> int:
    """Bytes of a tensor of `shape` (rows, cols) or (n,) stored as `qtype`."""
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_bytes(qtype, int(shape[-1]))


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK_SIZE:
        raise DllamaError(f"cannot quantize rows of {x.shape[-1]} values: not a multiple of {BLOCK_SIZE}")
    return x.reshape(-1, BLOCK_SIZE)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    # q (n, 32) uint8 in 0..15 -> (n, 16): value j in the low nibble, value j+16 in the high one
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    # qs (n, 16) -> (n, 32) uint8
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _inverse(d: np.ndarray) -> np.ndarray:
    # 1/d, and 0 where d is 0 or so small (subnormal) that 1/d overflows: such a scale is 0 in f16, so
    # every q decodes alike, and 0 keeps NaN and inf out of the integer cast
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return np.where(np.isfinite(inv), inv, np.float32(0)).astype(np.float32)


def _q40_blocks(b: np.ndarray) -> np.ndarray:
    # ggml: d = (the value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5))
    imax = np.abs(b).argmax(axis=1)[:, None]
    d = np.take_along_axis(b, imax, axis=1) / np.float32(-8)
    inv = _inverse(d)
    q = np.minimum(np.trunc(b * inv + np.float32(8.5)), np.float32(15)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def _q41_blocks(b: np.ndarray) -> np.ndarray:
    # ggml: d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5))
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(15)
    inv = _inverse(d)
    q = np.minimum(np.trunc((b - lo) * inv + np.float32(0.5)), np.float32(15)).astype(np.uint8)
    head = [d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8)]
    return np.concatenate(head + [_pack_nibbles(q)], axis=1)


def _q80_blocks(b: np.ndarray) -> np.ndarray:
    # ggml: d = max|x| / 127, q = roundf(x / d). One Q80 quantizer serves files, the activations the
    # kernels multiply and the network buffers, so all three round alike (C roundf, exact: adding 0.5 in
    # float32 would take 0.49999997 to 1). Imported here: numba only when Q80 is written.
    from dllama.kernels.quant import quantize_q80

    out = np.empty((b.shape[0], BLOCK_BYTES["q80"]), np.uint8)
    quantize_q80(np.ascontiguousarray(b), out)
    return out


_QUANTIZERS = {"q40": _q40_blocks, "q41": _q41_blocks, "q80": _q80_blocks}


def quantize(qtype: str, x: np.ndarray) -> np.ndarray:
    """f32 x (rows, cols) (or (n,)) -> uint8 (rows, row_bytes(qtype, cols)), in row-major block order."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    rows, cols = int(np.prod(x.shape[:-1])), x.shape[-1]
    if qtype == "f32":
        return np.ascontiguousarray(x, dtype=np.float32).reshape(rows, cols).view(np.uint8)
    if qtype == "f16":
        return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).reshape(rows, cols).view(np.uint8)
    fn = _QUANTIZERS.get(qtype)
    if fn is None:
        writable = [q for q in QTYPES if not QUANTS[q].read_only]
        raise DllamaError(f"cannot quantize to {qtype!r} (expected one of {', '.join(writable)})")
    blocks = _blocks(x)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // BLOCK_SIZE)
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = fn(blocks[i:i + step])
    return out.reshape(rows, row_bytes(qtype, cols))


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols // 32 * 18): ggml Q4_0 bytes."""
    return quantize("q40", x)


def quantize_q41(x: np.ndarray) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols // 32 * 20): ggml Q4_1 bytes."""
    return quantize("q41", x)


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols // 32 * 34): ggml Q8_0 bytes."""
    return quantize("q80", x)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols * 2): IEEE half, round to nearest even."""
    return quantize("f16", x)


def _dequantize_blocks(qtype: str, raw: np.ndarray) -> np.ndarray:
    # raw (n, BLOCK_BYTES[qtype]) uint8 -> (n, 32) f32
    d = raw[:, 0:2].view(np.float16).astype(np.float32)
    if qtype == "q40":
        q = _unpack_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)
        return q.astype(np.float32) * d
    if qtype == "q41":
        m = raw[:, 2:4].view(np.float16).astype(np.float32)
        return _unpack_nibbles(raw[:, 4:]).astype(np.float32) * d + m
    return raw[:, 2:].view(np.int8).astype(np.float32) * d


def dequantize(qtype: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Raw bytes (any shape, uint8) of `rows` rows of `cols` values -> f32 (rows, cols).

    Raises DllamaError when the byte count does not match the shape.
    """
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    expected = rows * row_bytes(qtype, cols)
    if raw.size != expected:
        raise DllamaError(f"{qtype} data of {rows}x{cols} needs {expected} bytes, got {raw.size}")
    if qtype == "f32":
        return raw.view(np.float32).reshape(rows, cols).copy()
    if qtype == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(rows, cols)
    q = QUANTS[qtype]
    if q.read_only:
        from dllama.kquants import DEQUANTIZERS

        fn = DEQUANTIZERS[qtype]
    else:
        fn = lambda b: _dequantize_blocks(qtype, b)  # noqa: E731
    blocks = raw.reshape(-1, q.type_size)
    out = np.empty((blocks.shape[0], q.block_size), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // q.block_size)
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = fn(blocks[i:i + step])
    return out.reshape(rows, cols)
