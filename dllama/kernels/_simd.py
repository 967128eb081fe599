"""Nibble x int8 block sums on the CPU's widest integer multiply-add (x86: AVX2 `vpmaddubsw` + `vpmaddwd`,
or `vpdpbusd` where AVX-512 VNNI / AVX-VNNI is present).

LLVM does not find `vpmaddubsw` in scalar code on its own (it proves the products cannot saturate, drops the
saturation the instruction is matched by, and multiplies in 16-bit lanes: twice the instructions), so on x86
the block is written here as explicit vector IR. Every other CPU (ARM NEON: `sdot`) runs `isums_any`, plain
numba that its LLVM vectorises; `simd_isa()` tells which one a process compiles.

Tile layout the sums read (the 16 packed bytes of each row's Q4 block, in quads)::

    qs[t, b, q, r, c]   q = 0..3, r = 0..63 (row of the tile), c = 0..3
    byte 4q + c of row r: low nibble = value 4q + c, high nibble = value 16 + 4q + c

so 32 consecutive bytes are 8 rows x 4 values: one `vpmaddubsw` against 4 activations broadcast, then
`vpmaddwd` by ones adds the row's two pairs (or one `vpdpbusd` does both), and on ARM one `sdot` by element.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

QUADS_BYTES = 4 * 64 * 4  # one (tile, block): 64 rows x 16 bytes


def simd_isa(features=None):
    """(kind, vector bytes) for the CPU numba compiles for (NUMBA_CPU_NAME/FEATURES honoured): kind 'vnni'
    or 'avx2' with 32 or 64 byte vectors, or (None, 0): the portable sums."""
    import numba
    from llvmlite import binding

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, 0
    if features is None:
        features = numba.config.CPU_FEATURES
        if features is None:
            features = binding.get_host_cpu_features().flatten()
        elif not features and numba.config.CPU_NAME:
            features = _named_cpu_features(numba.config.CPU_NAME)
    flags = set(features.split(","))
    wide = 64 if "+avx512bw" in flags else 32
    if "+avx512vnni" in flags and (wide == 64 or "+avx512vl" in flags):
        return "vnni", wide
    if "+avxvnni" in flags:
        return "vnni", 32
    return ("avx2", wide) if "+avx2" in flags else (None, 0)


def _named_cpu_features(cpu):
    """'+avx2' / '+avx512bw' as LLVM gives them to a named CPU (NUMBA_CPU_NAME with empty FEATURES, e.g.
    znver3): found by compiling byte-vector adds for it, since llvmlite cannot list a CPU's features."""
    from llvmlite import binding

    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    ir_text = "".join(f"define <{n} x i8> @f{n}(<{n} x i8> %a, <{n} x i8> %b) {{\n  %c = add <{n} x i8> %a, %b\n"
                      f"  ret <{n} x i8> %c\n}}\n" for n in (32, 64))
    tm = binding.Target.from_default_triple().create_target_machine(cpu=cpu, features="")
    asm = tm.emit_assembly(binding.parse_assembly(ir_text))
    f32, f64 = asm.split("f64:")[0], asm.split("f64:")[-1]
    return ",".join(flag for flag, ok in (("+avx2", "vpaddb\t%ymm" in f32), ("+avx512bw", "%zmm" in f64)) if ok)


@njit(inline="always", nogil=True, cache=True)
def isums_any(qs, t, b, xq, i0, ni, isum):
    # isum[i, r] = sum_j nibble(r, j) * xq[i0 + i, 32 b + j] for i < ni, over tile t, block b
    for i in range(ni):
        x = xq[i0 + i, b * 32:b * 32 + 32]
        for r in range(64):
            s = np.int32(0)
            for q in range(4):
                for c in range(4):
                    w = qs[t, b, q, r, c]
                    s += (np.int32(w & np.uint8(15)) * np.int32(x[4 * q + c])
                          + np.int32(w >> np.uint8(4)) * np.int32(x[16 + 4 * q + c]))
            isum[i, r] = s


def isums_x86(ni, kind, nbytes):
    """An intrinsic isums(qs, t, b, xq, i0, isum) for exactly `ni` activation rows (as isums_any), on
    `nbytes`-byte vectors: kind 'avx2' (vpmaddubsw + vpmaddwd) or 'vnni' (vpdpbusd). isum is C-contiguous
    with rows of 64."""
    i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    lanes = nbytes // 4  # int32 lanes: rows per vector
    vi8, vi16, vi32 = ir.VectorType(i8, nbytes), ir.VectorType(i16, nbytes // 2), ir.VectorType(i32, lanes)
    bits = "256" if nbytes == 32 else "512"
    names = {"dp": f"llvm.x86.avx512.vpdpbusd.{bits}",
             "ub": "llvm.x86.avx2.pmadd.ub.sw" if nbytes == 32 else "llvm.x86.avx512.pmaddubs.w.512",
             "wd": "llvm.x86.avx2.pmadd.wd" if nbytes == 32 else "llvm.x86.avx512.pmaddw.d.512"}

    def splat(ty, value):
        return ir.Constant(ty, [value] * ty.count)

    def c64(v):
        return ir.Constant(i64, v)

    def codegen(context, builder, sig, args):
        qs = context.make_array(sig.args[0])(context, builder, args[0])
        xq = context.make_array(sig.args[3])(context, builder, args[3])
        isum = context.make_array(sig.args[5])(context, builder, args[5])
        t, b, i0 = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (1, 2, 4))
        nb = cgutils.unpack_tuple(builder, qs.shape)[1]
        cols = cgutils.unpack_tuple(builder, xq.shape)[1]
        qbase = builder.gep(qs.data, [builder.mul(builder.add(builder.mul(t, nb), b), c64(QUADS_BYTES))])
        fn = {k: cgutils.get_or_insert_function(builder.module, ty, names[k]) for k, ty in (
            ("dp", ir.FunctionType(vi32, [vi32] * 3)), ("ub", ir.FunctionType(vi16, [vi8, vi8])),
            ("wd", ir.FunctionType(vi32, [vi16, vi16])))}
        # activations: 4 values broadcast to every row's quad, per (row i, quad q, low/high half)
        xs = [[[None, None] for _ in range(4)] for _ in range(ni)]
        for i in range(ni):
            row = builder.gep(xq.data, [builder.add(builder.mul(builder.add(i0, c64(i)), cols),
                                                    builder.mul(b, c64(32)))])
            for q in range(4):
                for h, off in enumerate((4 * q, 16 + 4 * q)):
                    v = builder.load(builder.bitcast(builder.gep(row, [c64(off)]), i32.as_pointer()), align=1)
                    vec = builder.insert_element(ir.Constant(vi32, None), v, ir.Constant(i32, 0))
                    vec = builder.shuffle_vector(vec, ir.Constant(vi32, None), ir.Constant(vi32, [0] * lanes))
                    xs[i][q][h] = vec if kind == "vnni" else builder.bitcast(vec, vi8)
        out = builder.bitcast(isum.data, i32.as_pointer())
        for g in range(64 // lanes):
            acc = [splat(vi32 if kind == "vnni" else vi16, 0) for _ in range(ni)]
            for q in range(4):
                ptr = builder.bitcast(builder.gep(qbase, [c64(q * 256 + g * nbytes)]), vi8.as_pointer())
                w = builder.load(ptr, align=1)
                halves = (builder.and_(w, splat(vi8, 15)), builder.lshr(w, splat(vi8, 4)))
                for h, nib in enumerate(halves):
                    for i in range(ni):
                        if kind == "vnni":
                            acc[i] = builder.call(fn["dp"], [acc[i], builder.bitcast(nib, vi32), xs[i][q][h]])
                        else:
                            # |sum| <= 8 x 2 x 15 x 127 < 2**15: the 16-bit sums never saturate
                            acc[i] = builder.add(acc[i], builder.call(fn["ub"], [nib, xs[i][q][h]]))
            for i in range(ni):
                s = acc[i] if kind == "vnni" else builder.call(fn["wd"], [acc[i], splat(vi16, 1)])
                builder.store(s, builder.bitcast(builder.gep(out, [c64(i * 64 + g * lanes)]), vi32.as_pointer()),
                              align=4)
        return context.get_dummy_value()

    @intrinsic
    def isums(typingctx, qs, t, b, xq, i0, isum):
        return types.none(qs, t, b, xq, i0, isum), codegen

    return isums
