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
joined in registers and multiplied unsigned, as the Q4 sums take nibbles (`_block_sums`). Q6_K's
offset 32 leaves the inner loop as -32 x each half's activation sum (exact integers).

    Q5_K  qs (tiles, blocks, 5, 64, 4) uint8; d and m as Q4_K: 5.625 bits per weight (the file: 5.5)
    Q6_K  qs (tiles, blocks, 6, 64, 4) uint8; d (tiles, super-blocks, 64) uint16: f16 d;
          m (tiles, 16 * super-blocks, 64) int8: the 16 scales. 6.5625 bits per weight, the file's.

Each is multiplied by one intrinsic per tile for 1 to 4 activation rows (`_tile_intrinsic`, on the
machinery of dllama.kernels._tiles): integer sums, each block's scales formed in registers from the
super-block's halves and 6-bit ints, conversion and accumulation. The float arithmetic has one fixed
order (see `_scale_add`), so every flavour gives the same bits.

Every other read-only type (Q2_K, Q3_K, Q5_0, Q5_1, BF16) is dequantized at load and re-quantized to Q80, a
row chunk at a time: correct, at Q80's speed and 8.5 bits per weight, one more rounding of each weight (at
most half a Q80 step, max|w|/254).
"""

from __future__ import annotations

import itertools

import numba
import numpy as np
from llvmlite import ir
from numba import get_thread_id, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from dllama import quants
from dllama.kernels import _matmul as mm
from dllama.kernels._simd import _MultiplyAdd, _registers, broadcast_quads
from dllama.kernels._tiles import _halves, _prefetch, _splat
from dllama.kernels.quant import quantize_act
from dllama.kquants import k4_scales, q5k_values, q6k_values

_CHUNK_VALUES = 1 << 20   # values re-quantized per pass at load: bounds the float32 temporary (4 MB)


def _mm_kquant(qs, d, m, x, xq, xd, xs, out, fs):
    # W q4k, q5k or q6k (rows, cols) @ x (n, cols) -> out (n, rows); _offsets and _tile (one tile for up to 4
    # activation rows, see _tile_intrinsic) are bound per type and flavour. fs (threads, 4, 64) f32: each
    # thread's tile results
    quantize_act(x, xq, xd, xs)
    n = x.shape[0]
    _offsets(xq, xs, n)
    for t in prange(qs.shape[0]):
        acc = fs[get_thread_id()]
        for i0 in range(0, n, 4):
            k = min(4, n - i0)
            _tile(qs, d, m, t, xq, xd, xs, i0, k, acc)
            for i in range(k):
                mm._store_row(acc[i], out[i0 + i], t * 64)


@numba.njit(inline="always", nogil=True, cache=True)
def _no_offsets(xq, xs, n):
    pass


@numba.njit(inline="always", nogil=True, cache=True)
def _q6_offsets(xq, xs, n):
    # Q6_K's xs (n, 2 blocks): -32 x each half's sum of xq, the quants' offset taken out of the inner loop
    # (they multiply as 0..63)
    for i in range(n):
        for b in range(xq.shape[1] // 32):
            lo = np.int32(0)
            hi = np.int32(0)
            for j in range(16):
                lo += np.int32(xq[i, 32 * b + j])
                hi += np.int32(xq[i, 32 * b + 16 + j])
            xs[i, 2 * b] = np.float32(-32 * lo)
            xs[i, 2 * b + 1] = np.float32(-32 * hi)


def _tile_intrinsic(ni, kind, nbytes, bits, by_bits=False):
    """An intrinsic tile(qs, d, m, t, xq, xd, xs, i0, acc): acc[i, r] = row r of tile t of a Q4_K (`bits` 4),
    Q5_K (5) or Q6_K (6) matrix packed as above, times activation row i0 + i, for i < ni, all blocks; acc
    C-contiguous with rows of 64 float32. `kind`, `nbytes`: the multiply-add flavour (_simd.simd_isa);
    `by_bits`: convert halves without F16C. The machinery of dllama.kernels._tiles (why one intrinsic per
    tile, the runs of row vectors, accumulators in L1), with each block's scales formed in registers from
    the super-block's halves and the 6-bit ints."""
    i64 = ir.IntType(64)

    def c64(v):
        return ir.Constant(i64, v)

    def codegen(context, builder, sig, args):
        qs, d, m, xq, xd, xs, acc_out = (context.make_array(sig.args[k])(context, builder, args[k])
                                         for k in (0, 1, 2, 4, 5, 6, 8))
        t, i0 = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (3, 7))
        nb = cgutils.unpack_tuple(builder, qs.shape)[1]
        ma = _MultiplyAdd(builder, kind, nbytes, False)
        fty = ir.VectorType(ir.FloatType(), ma.lanes)
        groups = 64 // ma.lanes
        run = min(groups, _run(ni, nbytes, bits, kind))
        out = builder.bitcast(acc_out.data, fty.as_pointer())
        for k in range(ni * groups):
            builder.store(ir.Constant(fty, [0.0] * ma.lanes), builder.gep(out, [c64(k)]), align=4)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            # quants and per-block ints ahead as _tiles does, and the super-block's halves (shared by 8 blocks)
            _prefetch(builder, builder.add(builder.mul(t, nb), b), bits * 256,
                      [(qs, bits * 256, 1), (m, 128, 1), (d, 128 if bits == 6 else 256, 8)])
            scales = _act_scales(builder, xd, xs, b, i0, ni, ma.lanes, 2 if bits == 6 else 1)
            for g0 in range(0, groups, run):
                accs = [[builder.gep(out, [c64(i * groups + g0 + g)]) for i in range(ni)] for g in range(run)]
                isums = _block_sums(builder, ma, qs, xq, t, b, nb, i0, ni, g0, run, bits)
                for g in range(run):
                    _scale_add(builder, (d, m), t, b, nb, (g0 + g) * ma.lanes, bits, by_bits, fty,
                               isums[g], scales, accs[g])
        return context.get_dummy_value()

    @intrinsic
    def tile(typingctx, qs, d, m, t, xq, xd, xs, i0, acc):
        return types.none(qs, d, m, t, xq, xd, xs, i0, acc), codegen

    return tile


def _run(ni, nbytes, bits, kind):
    """Row vectors per run (see _tiles._run): per vector and activation row an integer accumulator per sum
    (Q6_K: two, one per half), one more where AVX2's 16-bit sums widen on the way (Q5_K, Q6_K: one half at a
    time) and a float one, beside the weight vector and its planes, a quad's activations and the scales, as
    a power of two."""
    nsums = 2 if bits == 6 else 1
    widen = 1 if kind == "avx2" and bits > 4 else 0
    spare = _registers(nbytes) - 6 - (bits - 4)
    run = max(1, spare // (ni * (nsums + widen + 1)))
    return 1 << (run.bit_length() - 1)


def _block_sums(builder, ma, qs, xq, t, b, nb, i0, ni, g0, run, bits):
    """Block b's integer sums for the row vectors g0 .. g0 + run of tile t: sums[g][i][h] (int32 vectors),
    h the block's half (Q6_K: values 0-15, 16-31) or h 0 the whole block (Q4_K, Q5_K). The quants are
    nibbles (Q4_K) or joined in registers from the nibble quads and the high-bit planes after them (see
    _pack_planes): unsigned either way, as the Q4 sums take them. AVX2's 16-bit pair sums hold eight
    multiply-adds of nibbles, four of 5-bit quants (4 x 2 x 31 x 127 < 2**15) and two of 6-bit ones: they
    widen to 32 bits that often."""
    i64 = ir.IntType(64)
    width, nsums = bits - 4, 2 if bits == 6 else 1
    chain = {4: 8, 5: 4, 6: 2}[bits] if ma.kind == "avx2" else 8
    qbase = builder.gep(qs.data, [builder.mul(builder.add(builder.mul(t, nb), b), ir.Constant(i64, bits * 256))])

    def load(k, g):
        ptr = builder.gep(qbase, [ir.Constant(i64, k * 256 + (g0 + g) * ma.vi8.count)])
        return builder.load(builder.bitcast(ptr, ma.vi8.as_pointer()), align=1)

    def operand(nib, plane, h, q):
        # value 16h + 4q + c: its nibble, and its high bits moved from the plane to bit 4 on
        low = builder.and_(nib, ma.splat(ma.vi8, 15)) if h == 0 else builder.lshr(nib, ma.splat(ma.vi8, 4))
        if not width:
            return low
        src, at = (plane[h], 2 * q) if bits == 6 else (plane[0], 4 * h + q)
        top = src if at == 4 else (builder.shl(src, ma.splat(ma.vi8, 4 - at)) if at < 4
                                   else builder.lshr(src, ma.splat(ma.vi8, at - 4)))
        return builder.or_(low, builder.and_(top, ma.splat(ma.vi8, ((1 << width) - 1) << 4)))

    sums = [[[None] * nsums for _ in range(ni)] for _ in range(run)]
    part = [[[ma.zero()] * nsums for _ in range(ni)] for _ in range(run)]
    # Q6_K one half after the other: its sums for both halves, their partial sums and both halves' activations
    # would outlive the registers of a 4-row batch
    for halves in ([0], [1]) if nsums == 2 else ([0, 1],):
        count = 0
        for q in range(4):
            # this quad's activations only, so that they die before the next quad's
            xs_q = broadcast_quads(builder, ma, xq, i0, b, ni, [16 * h + 4 * q for h in halves])
            for g in range(run):
                nib, plane = load(q, g), [load(4 + k, g) for k in range(width)]
                for k, h in enumerate(halves):
                    w = operand(nib, plane, h, q)
                    for i in range(ni):
                        part[g][i][h % nsums] = ma.madd(part[g][i][h % nsums], w, xs_q[i][k])
            count += len(halves)
            if count == chain or q == 3:
                for g, i, s in itertools.product(range(run), range(ni), {h % nsums for h in halves}):
                    wide, prev = ma.isum(part[g][i][s]), sums[g][i][s]
                    sums[g][i][s] = wide if prev is None else builder.add(prev, wide)
                    part[g][i][s] = ma.zero()
                count = 0
    return sums


def _act_scales(builder, xd, xs, b, i0, ni, lanes, nsums):
    """Per activation row i of block b: (dx, [c]) splat to vectors: c = xs (Q4_K, Q5_K: the row's block sum
    times dx), or Q6_K's two offset terms (see _q6_offsets). Once per block for all runs (as _tiles._scales)."""
    i64 = ir.IntType(64)
    xcols, scols = cgutils.unpack_tuple(builder, xd.shape)[1], cgutils.unpack_tuple(builder, xs.shape)[1]
    out = []
    for i in range(ni):
        row = builder.add(i0, ir.Constant(i64, i))
        dx = builder.load(builder.gep(xd.data, [builder.add(builder.mul(row, xcols), b)]))
        at = builder.add(builder.mul(row, scols), builder.mul(b, ir.Constant(i64, nsums)))
        cs = [builder.load(builder.gep(xs.data, [builder.add(at, ir.Constant(i64, s))])) for s in range(nsums)]
        out.append((_splat(builder, dx, lanes), [_splat(builder, c, lanes) for c in cs]))
    return out


def _scale_add(builder, dm, t, b, nb, r0, bits, by_bits, fty, isums, scales, accs):
    """The float part of block b for the row vector r0 .. r0 + lanes of tile t, in this order (no fused
    multiply-add: LLVM contracts nothing without fast-math flags), so that every flavour gives the same bits:
        Q4_K, Q5_K  dw = d sc, mw = -(dmin m),  acc += dw dx isum + mw xs
        Q6_K        dlo, dhi = d sc[2b], d sc[2b + 1],  acc += dx (dlo (isum_lo + clo) + dhi (isum_hi + chi))
    d sc is exact in float32 (an f16 times a 6-bit or int8 integer), as in ggml."""
    d, m = dm
    i64, lanes = ir.IntType(64), fty.count
    sup = builder.lshr(b, ir.Constant(i64, 3))
    vi8 = ir.VectorType(ir.IntType(8), lanes)

    def ints(at, signed):
        # the 6-bit ints (Q6_K: int8) of `lanes` rows at row-vector index `at` of m, as floats
        vec = builder.load(builder.bitcast(builder.gep(m.data, [at]), vi8.as_pointer()), align=1)
        return builder.sitofp(vec, fty) if signed else builder.uitofp(vec, fty)

    def at(base, k):
        # element r0 of row vector base + k of a (..., 64) array
        return builder.add(builder.mul(builder.add(base, ir.Constant(i64, k)), ir.Constant(i64, 64)),
                           ir.Constant(i64, r0))

    if bits == 6:
        nsb = builder.lshr(nb, ir.Constant(i64, 3))
        dsup = _halves(builder, builder.gep(d.data, [at(builder.add(builder.mul(t, nsb), sup), 0)]), lanes,
                       by_bits)
        mbase = builder.mul(builder.add(builder.mul(t, nb), b), ir.Constant(i64, 2))   # = t 2nb + 2b
        dlo, dhi = (builder.fmul(dsup, ints(at(mbase, h), True)) for h in (0, 1))
    else:
        dbase = builder.add(builder.mul(t, builder.lshr(nb, ir.Constant(i64, 2))),   # t 2nsb + 2s
                            builder.shl(sup, ir.Constant(i64, 1)))
        dsup, msup = (_halves(builder, builder.gep(d.data, [at(dbase, k)]), lanes, by_bits) for k in (0, 1))
        mbase = builder.mul(builder.add(builder.mul(t, nb), b), ir.Constant(i64, 2))
        dw = builder.fmul(dsup, ints(at(mbase, 0), False))
        mw = builder.fneg(builder.fmul(msup, ints(at(mbase, 1), False)))
    for i, acc in enumerate(accs):
        dx, cs = scales[i]
        if bits == 6:
            lo, hi = (builder.fadd(builder.sitofp(isums[i][h], fty), cs[h]) for h in (0, 1))
            term = builder.fmul(dx, builder.fadd(builder.fmul(dlo, lo), builder.fmul(dhi, hi)))
        else:
            isum = builder.sitofp(isums[i][0], fty)
            term = builder.fadd(builder.fmul(builder.fmul(dw, dx), isum), builder.fmul(mw, cs[0]))
        builder.store(builder.fadd(builder.load(acc, align=4), term), acc, align=4)


def bindings(qtype, kind, nbytes, by_bits=None):
    """(body, globals to bind) of a K-quant type's kernel on one multiply-add flavour (see _simd.simd_isa);
    `by_bits`: convert f16 scales by bit arithmetic (default: this host's choice for that flavour)."""
    bits = _BITS[qtype]
    if by_bits is None:
        by_bits = mm.halves_by_bits(kind)
    tile = mm._by_rows(*(_tile_intrinsic(k, kind, nbytes, bits, by_bits) for k in (1, 2, 3, 4)))
    return _mm_kquant, {"_tile": tile, "_offsets": _q6_offsets if bits == 6 else _no_offsets}


# the helpers inlined from _matmul, _simd and _tiles: their sources' hashes in the kernels' names (see
# _matmul._source_tag)
_TAG = mm._SIMD_TAG + mm._source_tag(mm)
_BITS = {"q4k": 4, "q5k": 5, "q6k": 6}   # bits per quant


def kernels_for(qtype, kind, nbytes):
    """(serial, parallel) kernel of a K-quant type on a multiply-add flavour; tests compile the others."""
    body, bind = bindings(qtype, kind, nbytes)
    return mm._variants(body, f"_{qtype}_{kind}{nbytes}_{_TAG}", **bind)


KERNELS = {q: (k, k) for q in _BITS for k in [kernels_for(q, *mm._ISA)]}


def _packed(cls, qtype, rows, cols):
    W = cls(qtype, rows, cols)
    W.kernels = KERNELS[qtype]
    W._grow(1)
    threads = numba.config.NUMBA_NUM_THREADS
    W.fs = np.empty((threads, 4, mm.TILE), np.float32)
    return W


def _pack_planes(u, rows, nblocks, bits):
    """Unsigned quants of `bits` (5 or 6) bits, (rows * nblocks, 32) uint8 per 32-value block -> qs tiles
    (tiles, nblocks, bits, 64, 4) uint8: quads 0-3 the low 4 bits in Q4_0's nibble order (see _simd), then
    `bits - 4` planes of the high bits: the high bits of value 16h + 4q + c sit in byte c of plane h at bits
    2q, 2q + 1 (6-bit), or of the one plane at bit 4h + q (5-bit), where _block_sums takes them."""
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
    """A Q6_K matrix: its activation scratch holds two offset terms per block (see _q6_offsets)."""

    __slots__ = ()

    def _grow(self, n):
        super()._grow(n)
        self.xs = np.empty((n, 2 * (self.cols // 32)), np.float32)


def _pack_q6k(raw, rows, cols):
    nsb = cols // 256
    blocks = raw.reshape(rows * nsb, 210)
    W = _packed(_Q6Packed, "q6k", rows, cols)
    W.d = mm._tiles(np.ascontiguousarray(blocks[:, 208:210]).view(np.uint16).reshape(rows, nsb), rows, mm.TILE)
    W.m = mm._tiles(np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).reshape(rows, nsb * 16), rows, mm.TILE)
    W.qs = _pack_planes((q6k_values(blocks) + np.int8(32)).view(np.uint8).reshape(-1, 32), rows, nsb * 8, 6)
    W.nbytes = W.qs.nbytes + W.d.nbytes + W.m.nbytes
    return W


def _pack_k4(qtype, raw, rows, cols):
    # Q4_K and Q5_K: the same super-block head (d, dmin, 12 bytes of scales and mins), then the quants
    nsb = cols // 256
    blocks = raw.reshape(rows, nsb, -1)
    W = _packed(mm.Packed, qtype, rows, cols)
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
