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

4.625 bits per weight (the file: 4.5). Q5_K is the same with 5-bit quants (0..31), Q6_K has 6-bit ones
scaled every 16 values (int8), so each 32-value block needs two sums, one per half. Both travel at the
file's 5 or 6 bits: the low 4 as Q4_K's nibbles, the high ones in a plane after them (`_pack_planes`),
joined in registers and multiplied unsigned, as the Q4 sums take nibbles (`_unpacked_intrinsic`). Q6_K's
offset 32 leaves the inner loop as -32 x each half's activation sum (exact integers).

    Q5_K  qs (tiles, blocks, 5, 64, 4) uint8; d and m as Q4_K: 5.625 bits per weight (the file: 5.5)
    Q6_K  qs (tiles, blocks, 6, 64, 4) uint8; d (tiles, super-blocks, 64) uint16: f16 d;
          m (tiles, 16 * super-blocks, 64) int8: the 16 scales. 6.5625 bits per weight, the file's.

Every other read-only type (Q2_K, Q3_K, Q5_0, Q5_1, BF16) is dequantized at load and re-quantized to Q80, a
row chunk at a time: correct, at Q80's speed and 8.5 bits per weight, one more rounding of each weight (at
most half a Q80 step, max|w|/254).
"""

from __future__ import annotations

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


def _unpacked_intrinsic(ni, kind, nbytes, bits):
    """An intrinsic sums(qs, t, b, xq, i0, isum) over unsigned 5- or 6-bit quants (Q5_K 0..31, Q6_K 0..63),
    unpacked in registers from the nibble quads (as the Q4 sums read them) and the high-bit plane after them
    (see _pack_planes). Q6_K (bits 6) scales per 16 values: its sums stay apart for each block's lower 16
    values (isum[i]) and upper 16 (isum[4 + i]), i < ni; Q5_K's are whole blocks (isum[i]). AVX2's 16-bit
    pair sums hold four multiply-adds of 5-bit quants (4 x 2 x 31 x 127 < 2**15) and two of 6-bit ones."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    width, chain, nquads = bits - 4, 4 if bits == 5 else 2, 4 + bits - 4

    def c64(v):
        return ir.Constant(i64, v)

    def codegen(context, builder, sig, args):
        qs, xq, isum, t, b, i0 = block_args(context, builder, sig, args)
        nb = cgutils.unpack_tuple(builder, qs.shape)[1]
        qbase = builder.gep(qs.data, [builder.mul(builder.add(builder.mul(t, nb), b), c64(nquads * 256))])
        ma = _MultiplyAdd(builder, kind, nbytes, False)
        xs = broadcast_quads(builder, ma, xq, i0, b, ni, [4 * q for q in range(8)])   # value 16h + 4q + c: 4h + q
        out = builder.bitcast(isum.data, i32.as_pointer())

        def load(k, g):
            ptr = builder.gep(qbase, [c64(k * 256 + g * nbytes)])
            return builder.load(builder.bitcast(ptr, ma.vi8.as_pointer()), align=1)

        def operand(nib, plane, h, q):
            # value 16h + 4q + c: its nibble, and its high bits moved from the plane to bit 4 on
            low = builder.and_(nib[q], ma.splat(ma.vi8, 15)) if h == 0 else builder.lshr(nib[q], ma.splat(ma.vi8, 4))
            src, at = (plane[h], 2 * q) if bits == 6 else (plane[0], 4 * h + q)
            top = src if at == 4 else (builder.shl(src, ma.splat(ma.vi8, 4 - at)) if at < 4
                                       else builder.lshr(src, ma.splat(ma.vi8, at - 4)))
            return builder.or_(low, builder.and_(top, ma.splat(ma.vi8, ((1 << width) - 1) << 4)))

        for g in range(64 // ma.lanes):
            nib, plane = [load(q, g) for q in range(4)], [load(4 + k, g) for k in range(nquads - 4)]
            sums = [[None] * ni for _ in range(2)]
            for h in range(2):
                for q0 in range(0, 4, chain):
                    part = [ma.zero() for _ in range(ni)]
                    for q in range(q0, q0 + chain):
                        w = operand(nib, plane, h, q)
                        for i in range(ni):
                            part[i] = ma.madd(part[i], w, xs[i][4 * h + q])
                    for i in range(ni):
                        s = sums[h][i]
                        sums[h][i] = ma.isum(part[i]) if s is None else builder.add(s, ma.isum(part[i]))
            if bits == 5:
                sums = [[builder.add(sums[0][i], sums[1][i]) for i in range(ni)]]
            for h, row in enumerate(sums):
                for i in range(ni):
                    ptr = builder.gep(out, [c64((4 * h + i) * 64 + g * ma.lanes)])
                    builder.store(row[i], builder.bitcast(ptr, ma.vi32.as_pointer()), align=4)
        return context.get_dummy_value()

    @intrinsic
    def sums(typingctx, qs, t, b, xq, i0, isum):
        return types.none(qs, t, b, xq, i0, isum), codegen

    return sums


def _unpacked_sums(kind, nbytes, bits):
    """sums(qs, t, b, xq, i0, k, isum) for k <= 4 activation rows (as _matmul._isums)."""
    four, one = _unpacked_intrinsic(4, kind, nbytes, bits), _unpacked_intrinsic(1, kind, nbytes, bits)

    @numba.njit(inline="always", nogil=True, cache=True)
    def sums(qs, t, b, xq, i0, k, isum):
        if k == 4:
            four(qs, t, b, xq, i0, isum)
        else:
            for i in range(k):
                one(qs, t, b, xq, i0 + i, isum[i:])

    return sums


def bindings(qtype, kind, nbytes, scales=None):
    """(body, globals to bind) of a K-quant type's kernel on one multiply-add flavour (see _simd.simd_isa);
    `scales`: the f16 conversion (default: this host's choice for that flavour)."""
    body, bits = _BODIES[qtype]
    if scales is None:
        scales = mm._scales_bits if mm.halves_by_bits(kind) else halves_to_f32
    sums = mm._isums(kind, nbytes) if bits == 4 else _unpacked_sums(kind, nbytes, bits)
    return body, {"_isums": sums, "_halves": sums, "_scales": scales}


# the helpers inlined from _matmul and _simd: their sources' hashes in the kernels' names (see _matmul._source_tag)
_TAG = mm._SIMD_TAG + mm._source_tag(mm)
_BODIES = {"q4k": (_mm_q4k, 4), "q5k": (_mm_q4k, 5), "q6k": (_mm_q6k, 6)}   # body, bits per quant


def kernels_for(qtype, kind, nbytes):
    """(serial, parallel) kernel of a K-quant type on a multiply-add flavour; tests compile the others."""
    body, bind = bindings(qtype, kind, nbytes)
    return mm._variants(body, f"_{qtype}_{kind}{nbytes}_{_TAG}", **bind)


KERNELS = {q: (k, k) for q in _BODIES for k in [kernels_for(q, *mm._ISA)]}


def _packed(cls, qtype, rows, cols, ist_rows):
    W = cls(qtype, rows, cols)
    W.kernels = KERNELS[qtype]
    W._grow(1)
    threads = numba.config.NUMBA_NUM_THREADS
    W.fs, W.ist = np.empty((threads, 8, mm.TILE), np.float32), np.empty((threads, ist_rows, mm.TILE), np.int32)
    return W


def _pack_planes(u, rows, nblocks, bits):
    """Unsigned quants of `bits` (5 or 6) bits, (rows * nblocks, 32) uint8 per 32-value block -> qs tiles
    (tiles, nblocks, bits, 64, 4) uint8: quads 0-3 the low 4 bits in Q4_0's nibble order (see _simd), then
    `bits - 4` planes of the high bits: the high bits of value 16h + 4q + c sit in byte c of plane h at bits
    2q, 2q + 1 (6-bit), or of the one plane at bit 4h + q (5-bit), where _unpacked_intrinsic takes them."""
    width = bits - 4
    nibbles = (u[:, :16] & np.uint8(15)) | (u[:, 16:] << np.uint8(4))
    top = (u >> np.uint8(4)).reshape(-1, width, 8 // width, 4)              # [block, plane, field, c]
    plane = np.zeros((len(u), width, 4), np.uint8)
    for k in range(8 // width):
        plane |= top[:, :, k] << np.uint8(width * k)
    quads = np.concatenate([nibbles.reshape(-1, 4, 4), plane], axis=1)      # (blocks, bits, 4)
    tiles = mm._tiles(quads.reshape(rows, nblocks, 4 * bits).view(np.uint32), rows, mm.TILE)
    return tiles.view(np.uint8).reshape(tiles.shape[:3] + (mm.TILE, 4))


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
    W.qs = _pack_planes((q6k_values(blocks) + np.int8(32)).view(np.uint8).reshape(-1, 32), rows, nsb * 8, 6)
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
        W.qs = _pack_planes(q5k_values(blocks.reshape(rows * nsb, -1)).reshape(-1, 32), rows, nsb * 8, 5)
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
