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

4.625 bits per weight (the file: 4.5). Q5_K is the same with 5-bit quants, which the Q4 nibble sums cannot
hold: one int8 per value (0..31) in Q80's quad layout, summed by the signed (Q80) sums; 8.625 bits per weight
(the file: 5.5). Q6_K scales every 16 values (int8), so each 32-value block needs two sums, one per half
(`_halves_intrinsic`, which keeps them apart). Its quants multiply as they are stored, 0..63 (unsigned, as
the Q4 sums take nibbles), and the offset 32 leaves the inner loop as -32 x each half's activation sum. They
travel as the file has them, 6 bits each, and are unpacked in registers:

    qs  (tiles, blocks, 6, 64, 4) uint8: quads 0-3 the low 4 bits in Q4_0's nibble order (see _simd); quads
        4 + h the high 2 bits of values 16h + 4k + c at bits 2k, 2k + 1 of byte c (k = 0..3)
    d   (tiles, super-blocks, 64) uint16: f16 d;   m (tiles, 16 * super-blocks, 64) int8: the 16 scales

6.5625 bits per weight, the file's. Every other read-only type (Q2_K, Q3_K, Q5_0, Q5_1, BF16) is
dequantized at load and re-quantized to Q80, a row chunk at a time: correct, at Q80's speed and 8.5 bits
per weight, one more rounding of each weight (at most half a Q80 step, max|w|/254).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import get_thread_id, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from dllama import quants
from dllama.kernels import _matmul as mm
from dllama.kernels._simd import _MultiplyAdd, block_args, broadcast_quads, halves_to_f32
from dllama.kernels.quant import quantize_act
from dllama.kquants import k4_scales, q5k_values, q6k_values

_CHUNK_VALUES = 1 << 20   # values re-quantized per pass at load: bounds the float32 temporary (4 MB)


def _mm_q4k(qs, d, m, x, xq, xd, xs, out, fs, ist):
    # W q4k or q5k (rows, cols) @ x (n, cols) -> out (n, rows); fs (threads, 8, 64) f32, ist (threads, 4, 64) i32
    quantize_act(x, xq, xd, xs)
    ntiles, nb = qs.shape[0], qs.shape[1]
    n = x.shape[0]
    for t in prange(ntiles):
        tid = get_thread_id()
        acc0, acc1, acc2, acc3, dw, mw = fs[tid, 0], fs[tid, 1], fs[tid, 2], fs[tid, 3], fs[tid, 4], fs[tid, 5]
        dsup, msup = fs[tid, 6], fs[tid, 7]
        isum = ist[tid]
        for i0 in range(0, n, 4):
            k = min(4, n - i0)
            _zero(acc0, acc1, acc2, acc3)
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
            _store(acc0, acc1, acc2, acc3, out, i0, k, t * 64)


def _mm_q6k(qs, d, m, x, xq, xd, xs, out, fs, ist):
    # W q6k (rows, cols) @ x (n, cols) -> out (n, rows); fs (threads, 8, 64) f32, ist (threads, 8, 64) i32:
    # each block's sums over its lower 16 values (rows 0-3) and its upper 16 (rows 4-7). xs (n, 2 blocks):
    # -32 x each half's sum of xq, the quants' offset taken out of the inner loop (they multiply as 0..63)
    quantize_act(x, xq, xd, xs)
    n = x.shape[0]
    ntiles, nb = qs.shape[0], qs.shape[1]
    for i in range(n):
        for b in range(nb):
            lo = np.int32(0)
            hi = np.int32(0)
            for j in range(16):
                lo += np.int32(xq[i, 32 * b + j])
                hi += np.int32(xq[i, 32 * b + 16 + j])
            xs[i, 2 * b] = np.float32(-32 * lo)
            xs[i, 2 * b + 1] = np.float32(-32 * hi)
    for t in prange(ntiles):
        tid = get_thread_id()
        acc0, acc1, acc2, acc3, dlo, dhi = fs[tid, 0], fs[tid, 1], fs[tid, 2], fs[tid, 3], fs[tid, 4], fs[tid, 5]
        dsup = fs[tid, 6]
        isum = ist[tid]
        for i0 in range(0, n, 4):
            k = min(4, n - i0)
            _zero(acc0, acc1, acc2, acc3)
            for b in range(nb):
                if b % 8 == 0:
                    _scales(d, t, b // 8, dsup)
                for r in range(64):   # the scales of the block's halves: 16 per super-block, 2 per block
                    dlo[r] = dsup[r] * np.float32(m[t, 2 * b, r])
                    dhi[r] = dsup[r] * np.float32(m[t, 2 * b + 1, r])
                _halves(qs, t, b, xq, i0, k, isum)
                _halves_add(acc0, isum[0], isum[4], dlo, dhi, xd[i0, b], xs[i0, 2 * b], xs[i0, 2 * b + 1])
                if k > 1:
                    _halves_add(acc1, isum[1], isum[5], dlo, dhi, xd[i0 + 1, b], xs[i0 + 1, 2 * b],
                                xs[i0 + 1, 2 * b + 1])
                if k > 2:
                    _halves_add(acc2, isum[2], isum[6], dlo, dhi, xd[i0 + 2, b], xs[i0 + 2, 2 * b],
                                xs[i0 + 2, 2 * b + 1])
                if k > 3:
                    _halves_add(acc3, isum[3], isum[7], dlo, dhi, xd[i0 + 3, b], xs[i0 + 3, 2 * b],
                                xs[i0 + 3, 2 * b + 1])
            _store(acc0, acc1, acc2, acc3, out, i0, k, t * 64)


@numba.njit(inline="always", nogil=True, cache=True)
def _zero(acc0, acc1, acc2, acc3):
    acc0[:] = 0
    acc1[:] = 0
    acc2[:] = 0
    acc3[:] = 0


@numba.njit(inline="always", nogil=True, cache=True)
def _store(acc0, acc1, acc2, acc3, out, i0, k, r0):
    # the k (1..4) activation rows of a group, from the tile's accumulators
    mm._store_row(acc0, out[i0], r0)
    if k > 1:
        mm._store_row(acc1, out[i0 + 1], r0)
    if k > 2:
        mm._store_row(acc2, out[i0 + 2], r0)
    if k > 3:
        mm._store_row(acc3, out[i0 + 3], r0)


@numba.njit(inline="always", nogil=True, cache=True)
def _halves_add(acc, lo, hi, dlo, dhi, dx, clo, chi):
    # one activation row's block: each half's sum, less its offset (clo, chi: exact integers), at its own scale
    for r in range(64):
        acc[r] += dx * (dlo[r] * (np.float32(lo[r]) + clo) + dhi[r] * (np.float32(hi[r]) + chi))


def _halves_intrinsic(ni, kind, nbytes):
    """An intrinsic halves(qs, t, b, xq, i0, isum): the sums of Q6_K's unsigned 6-bit quants (0..63) with
    the activations, kept apart for each block's lower 16 values (isum[i]) and upper 16 (isum[4 + i]), i < ni:
    Q6_K scales per 16. The quants are unpacked in registers from the nibble quads (as the Q4 sums read them)
    and the 2-bit plane of _pack_q6k. AVX2's 16-bit pair sums hold two multiply-adds of 6-bit quants
    (2 x 2 x 63 x 127 < 2**15), so each half's four are summed two by two."""
    i32, i64 = ir.IntType(32), ir.IntType(64)

    def c64(v):
        return ir.Constant(i64, v)

    def codegen(context, builder, sig, args):
        qs, xq, isum, t, b, i0 = block_args(context, builder, sig, args)
        nb = cgutils.unpack_tuple(builder, qs.shape)[1]
        qbase = builder.gep(qs.data, [builder.mul(builder.add(builder.mul(t, nb), b), c64(6 * 256))])
        ma = _MultiplyAdd(builder, kind, nbytes, False)
        xs = broadcast_quads(builder, ma, xq, i0, b, ni, [4 * q for q in range(8)])   # value 16h + 4q + c: 4h + q
        out = builder.bitcast(isum.data, i32.as_pointer())

        def load(k, g):
            ptr = builder.gep(qbase, [c64(k * 256 + g * nbytes)])
            return builder.load(builder.bitcast(ptr, ma.vi8.as_pointer()), align=1)

        for g in range(64 // ma.lanes):
            nib, plane = [load(q, g) for q in range(4)], [load(4 + h, g) for h in range(2)]
            for h in range(2):
                acc = [None] * ni
                for pair in (0, 2):
                    part = [ma.zero() for _ in range(ni)]
                    for q in (pair, pair + 1):
                        low = builder.and_(nib[q], ma.splat(ma.vi8, 15)) if h == 0 else \
                            builder.lshr(nib[q], ma.splat(ma.vi8, 4))
                        shift = 4 - 2 * q    # bits 2q, 2q + 1 of the plane to bits 4, 5
                        top = plane[h] if shift == 0 else (builder.shl(plane[h], ma.splat(ma.vi8, shift)) if shift > 0
                                                           else builder.lshr(plane[h], ma.splat(ma.vi8, -shift)))
                        w = builder.or_(low, builder.and_(top, ma.splat(ma.vi8, 0x30)))
                        for i in range(ni):
                            part[i] = ma.madd(part[i], w, xs[i][4 * h + q])
                    for i in range(ni):
                        acc[i] = ma.isum(part[i]) if acc[i] is None else builder.add(acc[i], ma.isum(part[i]))
                for i in range(ni):
                    ptr = builder.gep(out, [c64((4 * h + i) * 64 + g * ma.lanes)])
                    builder.store(acc[i], builder.bitcast(ptr, ma.vi32.as_pointer()), align=4)
        return context.get_dummy_value()

    @intrinsic
    def halves(typingctx, qs, t, b, xq, i0, isum):
        return types.none(qs, t, b, xq, i0, isum), codegen

    return halves


def _halves_sums(kind, nbytes):
    """halves(qs, t, b, xq, i0, k, isum) for k <= 4 activation rows (as _matmul._isums)."""
    four, one = _halves_intrinsic(4, kind, nbytes), _halves_intrinsic(1, kind, nbytes)

    @numba.njit(inline="always", nogil=True, cache=True)
    def halves(qs, t, b, xq, i0, k, isum):
        if k == 4:
            four(qs, t, b, xq, i0, isum)
        else:
            for i in range(k):
                one(qs, t, b, xq, i0 + i, isum[i:])

    return halves


def _kernels(body, name, kind, nbytes, signed):
    """(serial, parallel) variants of one K-quant body on one multiply-add flavour (see _simd.simd_isa)."""
    scales = mm._scales_bits if (kind, platform.machine().lower()) == ("generic", "x86_64") else halves_to_f32
    return mm._variants(body, f"_{name}_{kind}{nbytes}_{_TAG}", _isums=mm._isums(kind, nbytes, signed),
                        _halves=_halves_sums(kind, nbytes), _scales=scales)


# the helpers inlined from _matmul and _simd: their sources' hashes in the kernels' names (see _matmul._source_tag)
_TAG = mm._SIMD_TAG + mm._source_tag(mm)
_BODIES = {"q4k": (_mm_q4k, False), "q5k": (_mm_q4k, True), "q6k": (_mm_q6k, True)}


def kernels_for(qtype, kind, nbytes):
    """(serial, parallel) kernel of a K-quant type on a multiply-add flavour; tests compile the others."""
    body, signed = _BODIES[qtype]
    return _kernels(body, qtype, kind, nbytes, signed)


KERNELS = {q: (k, k) for q in _BODIES for k in [kernels_for(q, *mm._ISA)]}


def _packed(cls, qtype, rows, cols, ist_rows):
    W = cls(qtype, rows, cols)
    W.kernels = KERNELS[qtype]
    W._grow(1)
    threads = numba.config.NUMBA_NUM_THREADS
    W.fs, W.ist = np.empty((threads, 8, mm.TILE), np.float32), np.empty((threads, ist_rows, mm.TILE), np.int32)
    return W


def _quads(values, rows, nblocks, dtype):
    # (rows * nblocks, 32) bytes of each 32-value block -> (tiles, nblocks, 8, TILE, 4): quads of rows side by side
    quads = mm._tiles(np.ascontiguousarray(values).reshape(rows, nblocks, 32).view(np.uint32), rows, mm.TILE)
    return quads.view(dtype).reshape(quads.shape[:3] + (mm.TILE, 4))


class _Q6Packed(mm.Packed):
    """A Q6_K matrix: its activation scratch holds two offset terms per block (see _mm_q6k)."""

    __slots__ = ()

    def _grow(self, n):
        super()._grow(n)
        self.xs = np.empty((n, 2 * (self.cols // 32)), np.float32)


def _pack_q6k(raw, rows, cols):
    nsb = cols // 256
    blocks = raw.reshape(rows * nsb, 210)
    W = _packed(_Q6Packed, "q6k", rows, cols, 8)
    W.d = mm._tiles(np.ascontiguousarray(blocks[:, 208:210]).view(np.uint16).reshape(rows, nsb), rows, mm.TILE)
    W.m = mm._tiles(np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).reshape(rows, nsb * 16), rows, mm.TILE)
    u = (q6k_values(blocks) + np.int8(32)).view(np.uint8).reshape(-1, 32)     # 0..63, per 32-value block
    nibbles = (u[:, :16] & np.uint8(15)) | (u[:, 16:] << np.uint8(4))         # Q4's order (see _simd)
    top = (u >> np.uint8(4)).reshape(-1, 2, 4, 4)                             # [block, h, k, c]: 16h + 4k + c
    plane = top[:, :, 0] | (top[:, :, 1] << np.uint8(2)) | (top[:, :, 2] << np.uint8(4)) | (top[:, :, 3] << np.uint8(6))
    quads = np.concatenate([nibbles.reshape(-1, 4, 4), plane], axis=1)       # (blocks, 6, 4)
    tiles = mm._tiles(quads.reshape(rows, nsb * 8, 24).view(np.uint32), rows, mm.TILE)
    W.qs = tiles.view(np.uint8).reshape(tiles.shape[:3] + (mm.TILE, 4))
    W.nbytes = W.qs.nbytes + W.d.nbytes + W.m.nbytes
    return W


def _pack_k4(qtype, raw, rows, cols):
    # Q4_K and Q5_K: the same super-block head (d, dmin, 12 bytes of scales and mins), then the quants
    nsb = cols // 256
    blocks = raw.reshape(rows, nsb, -1)
    W = _packed(mm.Packed, qtype, rows, cols, 4)
    halves = np.ascontiguousarray(blocks[:, :, 0:4]).view(np.uint16)          # (rows, nsb, 2): d, dmin
    W.d = mm._tiles(halves.reshape(rows, 2 * nsb), rows, mm.TILE)
    sc, mins = k4_scales(blocks[:, :, 4:16].reshape(-1, 12))
    W.m = mm._tiles(np.stack([sc.reshape(rows, -1), mins.reshape(rows, -1)], axis=2), rows, mm.TILE)
    if qtype == "q4k":
        q = _nibbles(blocks[:, :, 16:].reshape(-1, 128))                        # (rows * nsb * 8, 16)
        quads = mm._tiles(q.reshape(rows, nsb * 8, 16).view(np.uint32), rows, mm.TILE)
        W.qs = quads.view(np.uint8).reshape(quads.shape[:3] + (mm.TILE, 4))
    else:
        W.qs = _quads(q5k_values(blocks.reshape(rows * nsb, -1)).reshape(-1, 32), rows, nsb * 8, np.int8)
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
    if qtype == "q6k":
        return _pack_q6k(raw, rows, cols)
    if qtype in KERNELS:
        return _pack_k4(qtype, raw, rows, cols)
    return mm.pack("q80", _requantized(qtype, raw, rows, cols), rows, cols)
