"""A whole tile of a block-quantized matrix (Q40, Q41, Q80 weights x Q80 activations) in one intrinsic:
the integer block sums (dllama.kernels._simd), their conversion to float, the scales and the accumulation,
for 1 to 4 activation rows.

Why one intrinsic per tile and not per block: per block, the 64 rows' int32 sums went to memory and came
back to be converted and scaled by a numba loop, a call per block and activation row; in a 4-row pass that
cost twice the integer multiply-adds. Here the sums go from the multiply-adds' registers straight into the
conversion, the scales and the accumulators, a run of row vectors at a time, sized to the register file (an
integer accumulator per row vector and activation row, beside the weights, one quad's activations and the
scales). The float accumulators themselves stay in L1 (one load and one store per block and run): kept in
registers across the tile's blocks, each run would walk the whole tile, reading a tile streamed from memory
in strides, a cache line in four at a time (the output layer at 4 rows ran 2x slower; at chunks of 8
blocks, with or without software prefetch, 1.3-1.7x).

The float arithmetic is the numba code's it replaces, operation for operation and in the same order (no
fused multiply-add: LLVM contracts nothing without fast-math flags), so every flavour gives the same bits:
    q40, q80   acc_r += d_r (dx isum_r + c),  c = offset x xs   (offset -8 for q40; q80 has none)
    q41        acc_r += d_r dx isum_r + m_r xs

The weights are prefetched PREFETCH bytes ahead of the block being summed (the tiles lie one after another,
so past a tile's end that is the next tile's start): with the hardware prefetchers alone a 4-row matmul
streamed from memory ran 35% slower than in cache, the arithmetic waiting on the reads; the prefetches
took 6-16% off it, and 2-11% off a 1-row one (AVX2 and AVX-512 alike).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from dllama.kernels._simd import _MultiplyAdd, _registers, broadcast_quads, weight_operands

# bytes of packed weights prefetched ahead: 2 Q4 blocks of a tile, 1 Q80 one (of 1 to 8 KB, 2 KB did best)
PREFETCH = 2048


def _halves(builder, ptr, lanes, bits):
    """`lanes` IEEE halves at ptr (an i16*) as a float vector: the CPU's conversion, or (`bits`: x86 without
    F16C) the bit arithmetic of _bits.f16_to_f32 (exponent moved into place, one multiply by 2**112)."""
    i16, i32 = ir.IntType(16), ir.IntType(32)
    vec = builder.load(builder.bitcast(ptr, ir.VectorType(i16, lanes).as_pointer()), align=2)
    fty = ir.VectorType(ir.FloatType(), lanes)
    if not bits:
        return builder.fpext(builder.bitcast(vec, ir.VectorType(ir.HalfType(), lanes)), fty)
    vty = ir.VectorType(i32, lanes)

    def splat(v):
        return ir.Constant(vty, [v] * lanes)

    h = builder.zext(vec, vty)
    u = builder.or_(builder.shl(builder.and_(h, splat(0x8000)), splat(16)),
                    builder.shl(builder.and_(h, splat(0x7FFF)), splat(13)))
    return builder.fmul(builder.bitcast(u, fty), ir.Constant(fty, [5.192296858534828e33] * lanes))


def _run(ni, nbytes, q41):
    """Row vectors per run: an int and a float accumulator per vector and activation row, beside the weight
    vector and its two nibble halves, a quad's activations, the scales (and Q41's m), as a power of two."""
    spare = _registers(nbytes) - 6 - (1 if q41 else 0)
    run = max(1, spare // (2 * ni))
    return 1 << (run.bit_length() - 1)


def tile_intrinsic(ni, kind, nbytes, signed=False, q41=False, offset=-8.0, bits=False):
    """An intrinsic tile(qs, d, m, t, xq, xd, xs, i0, acc): acc[i, r] = row r of tile t times activation row
    i0 + i, for i < ni, all blocks; weights and activations as _matmul packs and quantize_act writes them
    (qs, d (tiles, blocks, 64) f16 bits, m the same for Q41), acc C-contiguous with rows of 64 float32.
    `kind`, `nbytes`: the multiply-add flavour (_simd.simd_isa); `signed`: Q80 weights; `q41`: m is used;
    `offset`: the value every Q4 weight is shifted by (-8 for Q40); `bits`: convert halves without F16C."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    nquads = 8 if signed else 4
    c_off = None if signed else "m" if q41 else offset

    def c64(v):
        return ir.Constant(i64, v)

    def codegen(context, builder, sig, args):
        qs, d, m, xq, xd, xs, acc_out = (context.make_array(sig.args[k])(context, builder, args[k])
                                         for k in (0, 1, 2, 4, 5, 6, 8))
        t, i0 = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (3, 7))
        nb = cgutils.unpack_tuple(builder, qs.shape)[1]
        xcols = cgutils.unpack_tuple(builder, xd.shape)[1]
        ma = _MultiplyAdd(builder, kind, nbytes, signed)
        lanes = ma.lanes
        fty = ir.VectorType(f32, lanes)
        groups = 64 // lanes
        run = min(groups, _run(ni, nbytes, q41))
        out = builder.bitcast(acc_out.data, fty.as_pointer())
        tile0 = builder.mul(t, nb)
        for k in range(ni * groups):
            builder.store(ir.Constant(fty, [0.0] * lanes), builder.gep(out, [c64(k)]), align=4)
        with cgutils.for_range(builder, nb) as loop:
            tb = builder.add(tile0, loop.index)
            _prefetch(builder, tb, nquads * 256, [(qs, nquads * 256, 1), (d, 128, 1)] + [(m, 128, 1)] * q41)
            scales = _scales(builder, xd, xs, loop.index, i0, ni, xcols, lanes, c_off)
            for g0 in range(0, groups, run):
                accs = [[builder.gep(out, [c64(i * groups + g0 + g)]) for i in range(ni)] for g in range(run)]
                _block(builder, ma, loop.index, g0, run, nquads, signed, q41, bits, accs,
                       (qs, d, m, xq), scales, tb, i0, fty)
        return context.get_dummy_value()

    @intrinsic
    def tile(typingctx, qs, d, m, t, xq, xd, xs, i0, acc):
        return types.none(qs, d, m, t, xq, xd, xs, i0, acc), codegen

    return tile


def _block(builder, ma, b, g0, run, nquads, signed, q41, bits, accs, arrays, scales, tb, i0, fty):
    """Block b of rows g0 * lanes .. (g0 + run) * lanes, for the activation rows whose float accumulators
    accs[g][i] points to: integer sums, converted, scaled (`scales`: see _scales) and added."""
    qs, d, m, xq = arrays
    i64 = ir.IntType(64)
    ni, lanes, nbytes = len(accs[0]), ma.lanes, ma.vi8.count

    def c64(v):
        return ir.Constant(i64, v)

    qbase = builder.gep(qs.data, [builder.mul(tb, c64(nquads * 256))])
    sums = [[ma.zero() for _ in range(ni)] for _ in range(run)]
    for q in range(nquads):
        # this quad's activations only, so that they die before the next quad's
        offs = [4 * q] if signed else [4 * q, 16 + 4 * q]
        xs_q = broadcast_quads(builder, ma, xq, i0, b, ni, offs)
        for g in range(run):
            for h, wk in enumerate(weight_operands(builder, ma, qbase, q * 256 + (g0 + g) * nbytes, signed)):
                for i in range(ni):
                    sums[g][i] = ma.madd(sums[g][i], wk, xs_q[i][h])
    for g in range(run):
        row0 = builder.add(builder.mul(tb, c64(64)), c64((g0 + g) * lanes))
        dw = _halves(builder, builder.gep(d.data, [row0]), lanes, bits)
        mw = _halves(builder, builder.gep(m.data, [row0]), lanes, bits) if q41 else None
        for i in range(ni):
            isum = builder.sitofp(ma.isum(sums[g][i]), fty)
            dx, c = scales[i]
            if q41:
                term = builder.fadd(builder.fmul(builder.fmul(dw, dx), isum), builder.fmul(mw, c))
            else:
                inner = builder.fmul(dx, isum)
                if c is not None:
                    inner = builder.fadd(inner, c)
                term = builder.fmul(dw, inner)
            builder.store(builder.fadd(builder.load(accs[g][i], align=4), term), accs[g][i], align=4)


def _prefetch(builder, tb, qbytes, arrays):
    """Prefetch block tb + k's lines (tb: the block's index over all tiles), k the blocks PREFETCH bytes of
    quants (`qbytes` per block) span: of each (array, bytes, blocks) in `arrays`, the `bytes` that `blocks`
    consecutive blocks share (1: the block's own; 8: a K-quant super-block's scales). A prefetch past the
    arrays' end does not fault."""
    i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    nxt = builder.add(tb, ir.Constant(i64, max(1, PREFETCH // qbytes)))
    for arr, size, blocks in arrays:
        unit = builder.udiv(nxt, ir.Constant(i64, blocks)) if blocks > 1 else nxt
        base = builder.gep(builder.bitcast(arr.data, i8p), [builder.mul(unit, ir.Constant(i64, size))])
        for off in range(0, size, 64):   # read, keep in all cache levels, data
            builder.call(fn, [builder.gep(base, [ir.Constant(i64, off)]), i32(0), i32(3), i32(1)])


def _scales(builder, xd, xs, b, i0, ni, xcols, lanes, c_off):
    """Per activation row i of block b: (dx, c) splat to vectors, c = xs (c_off "m": Q41), c_off x xs (Q40)
    or None (c_off None: Q80). Once per block for all runs: the runs' stores to the accumulators might alias
    xd and xs for all LLVM knows, so it would load them again in every run."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    out = []
    for i in range(ni):
        at = builder.add(builder.mul(builder.add(i0, ir.Constant(i64, i)), xcols), b)
        dx, sx = (builder.load(builder.gep(arr.data, [at])) for arr in (xd, xs))
        c = sx if c_off == "m" else None if c_off is None else builder.fmul(ir.Constant(f32, c_off), sx)
        out.append((_splat(builder, dx, lanes), None if c is None else _splat(builder, c, lanes)))
    return out


def _splat(builder, value, lanes):
    vty = ir.VectorType(value.type, lanes)
    vec = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, ir.Constant(vty, None), ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
