"""Nibble x int8 block sums on the CPU's widest integer multiply-add: x86 AVX2 `vpmaddubsw` + `vpmaddwd`,
`vpdpbusd` where AVX-512 VNNI / AVX-VNNI is present, ARM `sdot` where the dot-product extension is
(Cortex-A76: Raspberry Pi 5), and elsewhere plain LLVM vector IR (multiply, then add lanes in fours) that
any target compiles to its own widening multiplies (NEON without dotprod: Pi 4's Cortex-A72).

Why explicit vector IR (numba intrinsics) and not scalar loops: LLVM does not find `vpmaddubsw` in scalar
code (it proves the products cannot saturate, drops the saturation the instruction is matched by, and
multiplies in 16-bit lanes: twice the instructions), nor `sdot` in the row loop (it widens to 16 bits and
uses `smlal`: four times the instructions). Its target-independent `llvm.vector.partial.reduce.add` does
become `sdot`, but leaves which products meet in which lane unspecified, and here a lane is a row.
`simd_isa()` tells which flavour a process compiles.

Tile layout the sums read (the 16 packed bytes of each row's Q4 block, in quads)::

    qs[t, b, q, r, c]   q = 0..3, r = 0..63 (row of the tile), c = 0..3
    byte 4q + c of row r: low nibble = value 4q + c, high nibble = value 16 + 4q + c

so a vector of 4k bytes holds k rows x 4 values: one multiply-add against the 4 activations broadcast
(`vpmaddubsw` then `vpmaddwd` by ones to add the row's two pairs, or one `vpdpbusd`, or one `sdot`).
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba.core import cgutils

PORTABLE = ("generic", 16)


def simd_isa(features=None, machine=None):
    """(kind, vector bytes) for the CPU numba compiles for (NUMBA_CPU_NAME/FEATURES honoured): x86 'vnni' or
    'avx2' on 32 or 64 byte vectors, ARM ('sdot', 16), else PORTABLE."""
    import numba
    from llvmlite import binding

    machine = (machine or platform.machine()).lower()
    if features is None:
        features = numba.config.CPU_FEATURES
        if features is None:
            features = binding.get_host_cpu_features().flatten()
        elif not features and numba.config.CPU_NAME:
            features = _named_cpu_features(numba.config.CPU_NAME)
    flags = set(features.split(","))
    if machine in ("aarch64", "arm64"):
        return ("sdot", 16) if "+dotprod" in flags else PORTABLE
    if machine not in ("x86_64", "amd64"):
        return PORTABLE
    wide = 64 if "+avx512bw" in flags else 32
    if "+avx512vnni" in flags and (wide == 64 or "+avx512vl" in flags):
        return "vnni", wide
    if "+avxvnni" in flags:
        return "vnni", 32
    return ("avx2", wide) if "+avx2" in flags else PORTABLE


def _named_cpu_features(cpu):
    """'+avx2' / '+avx512bw' as LLVM gives them to a named x86 CPU (NUMBA_CPU_NAME with empty FEATURES, e.g.
    znver3): found by compiling byte-vector adds for it, since llvmlite cannot list a CPU's features."""
    from llvmlite import binding

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    ir_text = "".join(f"define <{n} x i8> @f{n}(<{n} x i8> %a, <{n} x i8> %b) {{\n  %c = add <{n} x i8> %a, %b\n"
                      f"  ret <{n} x i8> %c\n}}\n" for n in (32, 64))
    tm = binding.Target.from_default_triple().create_target_machine(cpu=cpu, features="")
    asm = tm.emit_assembly(binding.parse_assembly(ir_text))
    f32, f64 = asm.split("f64:")[0], asm.split("f64:")[-1]
    return ",".join(flag for flag, ok in (("+avx2", "vpaddb\t%ymm" in f32), ("+avx512bw", "%zmm" in f64)) if ok)


class _MultiplyAdd:
    """One flavour's IR: acc = madd(acc, weights, x quads broadcast) per vector of rows, then isum(acc).
    Weights are nibbles (0..15: unsigned and signed alike) or, `signed`, int8 (Q80)."""

    def __init__(self, builder, kind, nbytes, signed):
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        self.b, self.kind, self.signed, self.lanes = builder, kind, signed, nbytes // 4
        self.vi8, self.vi16, self.vi32 = (ir.VectorType(i8, nbytes), ir.VectorType(i16, nbytes // 2),
                                          ir.VectorType(i32, nbytes // 4))
        self.wide = ir.VectorType(i16, nbytes)  # generic: one lane per product (|w x| <= 128 x 127 < 2**15)
        bits = {16: "128", 32: "256", 64: "512"}[nbytes]
        decls = {
            "avx2": [("ub", self.vi16, [self.vi8, self.vi8],
                      "llvm.x86.avx2.pmadd.ub.sw" if nbytes == 32 else "llvm.x86.avx512.pmaddubs.w.512"),
                     ("wd", self.vi32, [self.vi16, self.vi16],
                      "llvm.x86.avx2.pmadd.wd" if nbytes == 32 else "llvm.x86.avx512.pmaddw.d.512")],
            "vnni": [("dp", self.vi32, [self.vi32] * 3, f"llvm.x86.avx512.vpdpbusd.{bits}")],
            "sdot": [("dp", self.vi32, [self.vi32, self.vi8, self.vi8], "llvm.aarch64.neon.sdot.v4i32.v16i8")],
            "generic": []}[kind]
        if signed and kind in ("avx2", "vnni"):
            decls.append(("abs", self.vi8, [self.vi8, ir.IntType(1)], f"llvm.abs.v{nbytes}i8"))
            if nbytes == 32:
                decls.append(("sign", self.vi8, [self.vi8, self.vi8], "llvm.x86.avx2.psign.b"))
        self.fn = {k: cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)
                   for k, ret, args, name in decls}

    def splat(self, ty, value):
        return ir.Constant(ty, [value] * ty.count)

    def zero(self):
        return self.splat(self.vi16 if self.kind == "avx2" and not self.signed else self.vi32, 0)

    def broadcast(self, quad):
        """4 activations (one i32) -> the operand every row's quad multiplies."""
        vec = self.b.insert_element(ir.Constant(self.vi32, None), quad, ir.Constant(ir.IntType(32), 0))
        vec = self.b.shuffle_vector(vec, ir.Constant(self.vi32, None), ir.Constant(self.vi32, [0] * self.lanes))
        vec = self.b.bitcast(vec, self.vi8)
        return self.b.sext(vec, self.wide) if self.kind == "generic" else vec

    def madd(self, acc, w, x):
        b = self.b
        if self.kind in ("avx2", "vnni") and self.signed:
            # x86 multiplies unsigned by signed bytes: |x| (once per broadcast: the same SSA value) times w
            # with x's sign, as llama.cpp does. |pair| <= 2 x 127 x 127 < 2**15. ggml's quantizer never
            # writes the weight -128, whose negation would wrap.
            if "sign" in self.fn:
                w = b.call(self.fn["sign"], [w, x])
            else:
                w = b.select(b.icmp_signed("<", x, self.splat(self.vi8, 0)), b.sub(self.splat(self.vi8, 0), w), w)
            w, x = b.call(self.fn["abs"], [x, ir.Constant(ir.IntType(1), 0)]), w
        if self.kind == "avx2":
            pairs = b.call(self.fn["ub"], [w, x])
            if self.signed:  # pair sums of int8 products would overflow 16 bits when added: widen now
                return b.add(acc, b.call(self.fn["wd"], [pairs, self.splat(self.vi16, 1)]))
            # |sum| <= 8 x 2 x 15 x 127 < 2**15: the 16-bit sums of nibble products never saturate
            return b.add(acc, pairs)
        if self.kind == "vnni":
            return b.call(self.fn["dp"], [acc, b.bitcast(w, self.vi32), b.bitcast(x, self.vi32)])
        if self.kind == "sdot":  # nibbles 0..15 are non-negative signed bytes too
            return b.call(self.fn["dp"], [acc, w, x])
        prod = b.mul(b.sext(w, self.wide), x)
        for n in (self.wide.count // 2, self.wide.count // 4):  # add neighbours twice: lanes of 4 -> 1
            undef, ty = ir.Constant(prod.type, None), ir.VectorType(ir.IntType(32), n)
            halves = [b.shuffle_vector(prod, undef, ir.Constant(ty, list(range(k, 2 * n, 2)))) for k in (0, 1)]
            if prod.type.element == ir.IntType(16):   # the first add widens (NEON saddlp)
                halves = [b.sext(h, ty) for h in halves]
            prod = b.add(*halves)
        return b.add(acc, prod)

    def isum(self, acc):
        if self.kind == "avx2" and not self.signed:
            return self.b.call(self.fn["wd"], [acc, self.splat(self.vi16, 1)])
        return acc


def broadcast_quads(builder, ma, xq, i0, b, ni, offsets):
    """xs[i][k]: the 4 activations at `offsets[k]` of block b of row i0 + i of xq (i < ni), broadcast by
    `ma` (a _MultiplyAdd) to the operand every weight row's quad multiplies."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    cols = cgutils.unpack_tuple(builder, xq.shape)[1]
    xs = []
    for i in range(ni):
        row = builder.gep(xq.data, [builder.add(builder.mul(builder.add(i0, ir.Constant(i64, i)), cols),
                                                builder.mul(b, ir.Constant(i64, 32)))])
        xs.append([ma.broadcast(builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, off)]),
                                                             i32.as_pointer()), align=1)) for off in offsets])
    return xs


def _registers(nbytes):
    """Vector registers of a flavour: 32 with AVX-512 and on ARM (16-byte vectors), 16 with AVX2."""
    return 16 if nbytes == 32 else 32


def weight_operands(builder, ma, qbase, offset, signed):
    """The weight vector at byte `offset` of qbase (an i8*) as what it multiplies: itself (`signed`: Q80
    int8), or its low nibbles (values 4q + c of each row's quad q) and its high ones (16 + 4q + c)."""
    ptr = builder.gep(qbase, [ir.Constant(ir.IntType(64), offset)])
    w = builder.load(builder.bitcast(ptr, ma.vi8.as_pointer()), align=1)
    if signed:
        return (w,)
    return builder.and_(w, ma.splat(ma.vi8, 15)), builder.lshr(w, ma.splat(ma.vi8, 4))
