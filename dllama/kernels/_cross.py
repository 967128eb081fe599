"""What the hot kernels compile to on a CPU we cannot run: numba lowers a kernel to LLVM IR (not compiled
for this host), llvmlite optimises and emits it for another target. Used by `bench/kernels.py --arm` and
the ARM assembly test.

    asm = target_asm("q4", "aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod")   # or q4k, q5k, q6k

The IR is numba's own, lowered for the flavour that target would pick (`_simd.simd_isa`), then optimised
at O3 with the target's cost model (so vector widths and unrolling are the target's, not this host's).
"""

from __future__ import annotations

import re

import numpy as np


def _kernel_ir(name, kind, nbytes):
    """LLVM IR texts of one serial kernel's module and of the modules it links, and the kernel's symbol."""
    import numba
    from numba.core import compiler, registry
    from numba.core.compiler_lock import global_compiler_lock

    from dllama.kernels import _attention as at
    from dllama.kernels import _matmul as mm
    from dllama.kernels import ops

    f32 = np.float32
    if name == "q4":
        W = mm.pack("q40", np.zeros(64 * 2 * 18, np.uint8), 64, 64)
        x, out = np.ones((1, 64), f32), np.empty((1, 64), f32)
        fn = mm._bound(mm._mm_blocks, "_cross", get_thread_id=mm._thread_zero,
                       _tile=mm._tile_fn(kind, nbytes, False, False))
        args = (W.qs, W.d, W.m, x, W.xq, W.xd, W.xs, out, W.fs)
    elif name in ("q4k", "q5k", "q6k"):
        from dllama import quants
        from dllama.kernels import _kquant as kq

        W = kq.pack(name, np.zeros(64 * quants.row_bytes(name, 256), np.uint8), 64, 256)
        x, out = np.ones((1, 256), f32), np.empty((1, 64), f32)
        body, bind = kq.bindings(name, kind, nbytes, False)
        fn = mm._bound(body, "_cross", get_thread_id=mm._thread_zero, **bind)
        args = (W.qs, W.d, W.m, x, W.xq, W.xd, W.xs, out, W.fs)
    elif name == "attention":
        q, cache = np.ones((1, 64), f32), np.ones((4, 64), f32)
        fn = at._attention
        # one head, group 1, first 0, 64 values; scale 0 (1/sqrt(64)), no soft cap
        args = (q, cache, cache, np.zeros(1, np.int64), np.zeros(1, np.int64), 1, 1, 0, 64, np.empty((1, 4), f32),
                np.empty_like(q), 0.0, 0.0)
    elif name in ("rmsnorm", "swiglu"):
        x = np.ones((1, 64), f32)
        fn = {"rmsnorm": ops.rmsnorm, "swiglu": ops.swiglu}[name].py_func
        args = (x, np.ones(64, f32), 1e-5, np.empty_like(x)) if name == "rmsnorm" else (x, 32, np.empty((1, 32), f32))
    else:
        raise ValueError(f"no kernel {name!r}")
    flags = compiler.Flags()
    flags.no_compile = flags.no_cpython_wrapper = flags.no_cfunc_wrapper = True
    flags.nrt = True
    if name == "attention":
        flags.fastmath = numba.core.cpu.FastMathOptions(at._FLAGS["fastmath"])
    if name in ("rmsnorm", "swiglu"):
        flags.error_model = "numpy"
    target = registry.cpu_target
    with global_compiler_lock:
        cres = compiler.compile_extra(target.typing_context, target.target_context, fn,
                                      tuple(numba.typeof(a) for a in args), None, flags, {})
    # the helpers it calls (min, max, other kernels) were compiled into libraries of their own: linked in, as
    # numba does before optimising, so that they inline
    texts = [str(cres.library._final_module)]
    texts += [str(lib._get_module_for_linking()) for lib in cres.library._linking_libraries]
    # ...except those this host's codegen already made x86-specific (the runtime's atomics): left declared
    texts = texts[:1] + [t for t in texts[1:] if "llvm.x86." not in t]
    return texts, cres.fndesc.mangled_name


def target_asm(name, triple, cpu, features, kind=None, nbytes=16):
    """(assembly of kernel `name` for the target, the kernel's symbol). `kind`: the Q4 flavour (default:
    what simd_isa picks for that target's features)."""
    import llvmlite.binding as llvm

    from dllama.kernels._simd import simd_isa

    if kind is None:
        kind, nbytes = simd_isa(features, triple.split("-")[0])
    texts, symbol = _kernel_ir(name, kind, nbytes)
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
    mods = []
    for text in texts:
        text = re.sub(r'target datalayout = ".*"', f'target datalayout = "{tm.target_data}"', text)
        text = re.sub(r'target triple = ".*"', f'target triple = "{triple}"', text)
        # this host's CPU attributes would override the target's
        mods.append(llvm.parse_assembly(re.sub(r'"target-(cpu|features)"="[^"]*"', "", text)))
    mod = mods[0]
    for other in mods[1:]:
        mod.link_in(other, preserve=True)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod), symbol


def function_body(asm, symbol):
    """The instructions of one function in an assembly listing."""
    m = re.search(r"^%s:\n(.*?)^\s*\.size\s+%s" % (re.escape(symbol), re.escape(symbol)), asm, re.S | re.M)
    if not m:
        raise ValueError(f"{symbol} not in the assembly")
    return m.group(1)


def loops(body):
    """The loops of a function body, each as the text of its blocks (from a backward branch's target
    to the branch), innermost first."""
    blocks = re.split(r"\n(?=\.LBB\w*:)", body)
    index = {m.group(1): k for k, b in enumerate(blocks) if (m := re.match(r"(\.LBB\w*):", b))}
    regions = set()
    for k, b in enumerate(blocks):
        for target in re.findall(r"(\.LBB\w+)\s*$", b, re.M):
            if index.get(target, k + 1) <= k:
                regions.add((index[target], k))
    return ["\n".join(blocks[j:k + 1]) for j, k in sorted(regions, key=lambda r: r[1] - r[0])]


def instruction_mix(text):
    """Counter of (class, mnemonic): class 'vector' (NEON v-registers or q-registers, x86 ymm/zmm),
    'fp-scalar' (ARM s/d/h registers, x86 xmm: scalar or 128-bit) or 'scalar' (general registers)."""
    import collections

    mix = collections.Counter()
    for op, args in re.findall(r"^\s+([a-z][a-z0-9.]*)\s+(.*)$", text, re.M):
        if re.search(r"\bv\d+\.(16b|8h|4s|2d|8b|4h|2s)|\bq\d+\b|%[yz]mm", args):
            mix["vector", op] += 1
        elif re.search(r"\b[sdh]\d+\b|%xmm", args):
            mix["fp-scalar", op] += 1
        else:
            mix["scalar", op] += 1
    return mix
