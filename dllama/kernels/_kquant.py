"""K-quant weights (GGUF Q4_K and the other read-only types of dllama.quants) for matmul.

    W = pack(qtype, raw_rows, rows, cols)   # any type of the registry; the others go to _matmul.pack

Q4_K is multiplied as it is: a 256-value super-block is 8 sub-blocks of 32, each `d*sc*q - dmin*m` with
6-bit sc and m, which is Q4_1's `q * d' + m'` with d' = d*sc and m' = -dmin*m per 32 values. So the Q80
activations of the block kernels fit, and the integer sums are the Q4 ones of dllama.kernels._simd; only
the scales differ, and they are formed per block from the super-block's halves (exact: an f16 times a
6-bit integer is exact in f32, as in ggml). Packed layout, tiles of 64 rows as in _matmul:

    qs  (tiles, blocks, 4, 64, 4) uint8: each 32-value sub-block's nibbles in Q4_0's order (see _simd)
    d   (tiles, 2 * super-blocks, 64) uint16: f16 d at [t, 2s, r], dmin at [t, 2s + 1, r]
    m   (tiles, blocks, 2, 64) uint8: the sub-block's 6-bit scale at [t, b, 0, r], its min at [t, b, 1, r]

4.625 bits per weight (the file: 4.5). Every other read-only type (Q2_K, Q3_K, Q5_K, Q6_K, Q5_0, Q5_1,
BF16) is dequantized at load and re-quantized to Q80, a row chunk at a time: correct, at Q80's speed
and 8.5 bits per weight, one more rounding of each weight (at most half a Q80 step, max|w|/254).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from numba import get_thread_id, prange

from dllama import quants
from dllama.kernels import _matmul as mm
from dllama.kernels._simd import halves_to_f32
from dllama.kernels.quant import quantize_act
from dllama.kquants import k4_scales

_CHUNK_VALUES = 1 << 20   # values re-quantized per pass at load: bounds the float32 temporary (4 MB)


def _mm_q4k(qs, d, m, x, xq, xd, xs, out, fs, ist):
    # W q4k (rows, cols) @ x (n, cols) -> out (n, rows); fs (threads, 8, 64) f32, ist (threads, 4, 64) i32
    quantize_act(x, xq, xd, xs)
    ntiles, nb = qs.shape[0], qs.shape[1]
    T = 64
    n = x.shape[0]
    for t in prange(ntiles):
        tid = get_thread_id()
        acc0, acc1, acc2, acc3, dw, mw = fs[tid, 0], fs[tid, 1], fs[tid, 2], fs[tid, 3], fs[tid, 4], fs[tid, 5]
        dsup, msup = fs[tid, 6], fs[tid, 7]
        isum = ist[tid]
        for i0 in range(0, n, 4):
            k = min(4, n - i0)
            acc0[:] = 0
            acc1[:] = 0
            acc2[:] = 0
            acc3[:] = 0
            for b in range(nb):
                if b % 8 == 0:
                    _scales(d, t, b // 4, dsup)
                    _scales(d, t, b // 4 + 1, msup)
                for r in range(64):
                    dw[r] = dsup[r] * np.float32(m[t, b, 0, r])
                    mw[r] = -(msup[r] * np.float32(m[t, b, 1, r]))
                _isums(qs, t, b, xq, i0, k, isum)
                mm._scale_add(acc0, isum[0], dw, mw, xd[i0, b], xs[i0, b], True)
                if k > 1:
                    mm._scale_add(acc1, isum[1], dw, mw, xd[i0 + 1, b], xs[i0 + 1, b], True)
                if k > 2:
                    mm._scale_add(acc2, isum[2], dw, mw, xd[i0 + 2, b], xs[i0 + 2, b], True)
                if k > 3:
                    mm._scale_add(acc3, isum[3], dw, mw, xd[i0 + 3, b], xs[i0 + 3, b], True)
            mm._store_row(acc0, out[i0], t * T)
            if k > 1:
                mm._store_row(acc1, out[i0 + 1], t * T)
            if k > 2:
                mm._store_row(acc2, out[i0 + 2], t * T)
            if k > 3:
                mm._store_row(acc3, out[i0 + 3], t * T)


def _q4k_kernels(kind, nbytes):
    """(serial, parallel) Q4_K kernel on one multiply-add flavour (see _simd.simd_isa)."""
    scales = mm._scales_bits if (kind, platform.machine().lower()) == ("generic", "x86_64") else halves_to_f32
    return mm._variants(_mm_q4k, f"_{kind}{nbytes}_{_TAG}", _isums=mm._isums(kind, nbytes), _scales=scales)


# the helpers inlined from _matmul and _simd: their sources' hashes in the kernels' names (see _matmul._source_tag)
_TAG = mm._SIMD_TAG + mm._source_tag(mm)


_Q4K = _q4k_kernels(*mm._ISA)
KERNELS = {"q4k": (_Q4K, _Q4K)}


def _pack_q4k(raw, rows, cols):
    nsb = cols // 256
    blocks = raw.reshape(rows, nsb, 144)
    W = mm.Packed("q4k", rows, cols)
    W.kernels = KERNELS["q4k"]
    W._grow(1)
    threads = numba.config.NUMBA_NUM_THREADS
    W.fs, W.ist = np.empty((threads, 8, mm.TILE), np.float32), np.empty((threads, 4, mm.TILE), np.int32)
    halves = np.ascontiguousarray(blocks[:, :, 0:4]).view(np.uint16)          # (rows, nsb, 2): d, dmin
    W.d = mm._tiles(halves.reshape(rows, 2 * nsb), rows, mm.TILE)
    sc, mins = k4_scales(blocks[:, :, 4:16].reshape(-1, 12))
    W.m = mm._tiles(np.stack([sc.reshape(rows, -1), mins.reshape(rows, -1)], axis=2), rows, mm.TILE)
    q = _nibbles(blocks[:, :, 16:].reshape(-1, 128))                            # (rows * nsb * 8, 16)
    quads = mm._tiles(q.reshape(rows, nsb * 8, 16).view(np.uint32), rows, mm.TILE)
    W.qs = quads.view(np.uint8).reshape(quads.shape[:3] + (mm.TILE, 4))
    W.nbytes = W.qs.nbytes + W.d.nbytes + W.m.nbytes
    return W


def _nibbles(qs):
    # Q4_K quants (n, 128) -> (n * 8, 16): per 32-value sub-block, value j in the low nibble of byte j and
    # value 16 + j in its high nibble (Q4_0's order, which the Q4 sums read)
    chunk = qs.reshape(-1, 4, 32)
    values = np.stack([chunk & np.uint8(15), chunk >> np.uint8(4)], axis=2).reshape(-1, 32)
    return values[:, :16] | (values[:, 16:] << np.uint8(4))


def _requantized(qtype, raw, rows, cols):
    """Raw rows of a read-only type -> the same rows as Q80 bytes, a bounded chunk of rows at a time."""
    rb = quants.row_bytes(qtype, cols)
    out = np.empty((rows, quants.row_bytes("q80", cols)), np.uint8)
    step = max(1, _CHUNK_VALUES // cols)
    for r in range(0, rows, step):
        stop = min(rows, r + step)
        out[r:stop] = quants.quantize("q80", quants.dequantize(qtype, raw[r * rb:stop * rb], stop - r, cols))
    return out


def pack(qtype, raw_rows, rows, cols):
    """`_matmul.pack` for every type of the registry (see the module's doc). Raises DllamaError."""
    q = quants.quant(qtype)
    if not q.read_only:
        return mm.pack(qtype, raw_rows, rows, cols)
    from dllama.errors import DllamaError

    try:
        row_bytes = quants.row_bytes(qtype, cols)
    except DllamaError as exc:
        raise DllamaError(f"{qtype} matrix of {rows}x{cols}: {exc}") from None
    raw = np.asarray(raw_rows).reshape(-1).view(np.uint8)
    if raw.size != rows * row_bytes:
        raise DllamaError(f"{qtype} matrix of {rows}x{cols} needs {rows * row_bytes} bytes, got {raw.size}")
    if qtype in KERNELS:
        return _pack_q4k(raw, rows, cols)
    return mm.pack("q80", _requantized(qtype, raw, rows, cols), rows, cols)
