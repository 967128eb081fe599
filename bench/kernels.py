"""Matrix-vector speed of every weight type: GB/s of weight bytes, cold caches, 1 and 2 threads.

    python bench/kernels.py [--threads 1,2] [--repeat 15] [--batch 32]
    python bench/kernels.py --asm      # which vector instructions the hot loops compiled to
    python bench/kernels.py --arm      # the same for Raspberry Pi CPUs, compiled here (dllama.kernels._cross)

Each measurement rotates through enough copies of the matrix (> 64 MB, twice the L3) that the
weights stream from memory, as they do in a real forward pass. The same-run peer is numpy's
float32 BLAS (OpenBLAS) on the dequantized matrix; its "Q40-equivalent" column divides the Q40
bytes of the same matrix by its time, i.e. how fast it gets through the same model. The last
rows ("@32") time one prompt batch of 32 activation rows against the first matrix (weights read
once per call, so GB/s there is weight bytes per second of the batch call).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

SHAPES = ((2048, 8192), (8192, 2048))
ROTATE_BYTES = 64 << 20
BYTES_PER_32 = {"q40": 18, "q41": 20, "q80": 34, "f16": 64, "f32": 128}
# K-quants (super-blocks of 256 values): their bytes each, and where their f16 scales sit
K_BLOCKS = {"q4k": (144, (0, 2)), "q6k": (210, (208,))}
QTYPES = ("q40", "q41", "q80", "q4k", "q6k", "f16", "f32")


def ggml_bytes(qtype, rows, cols):
    """Bytes of a matrix as ggml stores it (what the file holds)."""
    if qtype in K_BLOCKS:
        return rows * cols // 256 * K_BLOCKS[qtype][0]
    return rows * cols // 32 * BYTES_PER_32[qtype]


def random_raw(qtype, rows, cols, rng):
    """Raw ggml bytes of a random matrix: random quants, scales ~0.01 (speed only, not values)."""
    if qtype == "f32":
        return (rng.standard_normal((rows, cols), np.float32) * 0.02).view(np.uint8).reshape(-1)
    if qtype == "f16":
        return (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16).view(np.uint8).reshape(-1)
    if qtype in K_BLOCKS:
        size, halves = K_BLOCKS[qtype]
        raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
        for off in halves:
            raw[:, :, off:off + 2] = np.full((rows, cols // 256), 0.01, np.float16).view(np.uint8).reshape(rows, -1, 2)
        return raw.reshape(-1)
    nb = BYTES_PER_32[qtype]
    raw = rng.integers(0, 256, (rows, cols // 32, nb), dtype=np.uint8)
    scale = np.full((rows, cols // 32), 0.01, np.float16).view(np.uint8).reshape(rows, cols // 32, 2)
    raw[:, :, 0:2] = scale
    if qtype == "q41":
        raw[:, :, 2:4] = scale
    return raw.reshape(-1)


def timed(fn, copies, repeat):
    """(median, best) seconds of one call, each call on the next copy (cold). On a shared machine
    the best shows what the kernel does when it has the cores; the median what one got."""
    fn(copies[0])
    times = []
    for k in range(repeat * len(copies)):
        c = copies[k % len(copies)]
        t = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def child(threads, repeat, batch):
    import dllama.kernels as K

    K.set_threads(threads)
    rng = np.random.default_rng(0)
    for n, rows, cols in [(1, r, c) for r, c in SHAPES] + ([(batch, *SHAPES[0])] if batch > 1 else []):
        x = rng.standard_normal((n, cols), np.float32)
        out = np.empty((n, rows), np.float32)
        q40_bytes = rows * cols // 32 * 18
        for qtype in QTYPES:
            nbytes = ggml_bytes(qtype, rows, cols)
            ncopies = max(2, -(-ROTATE_BYTES // nbytes) + 1)
            raw = random_raw(qtype, rows, cols, rng)
            copies = [K.pack(qtype, raw.copy(), rows, cols) for _ in range(ncopies)]
            sec, best = timed(lambda W: K.matmul(W, x, out), copies, repeat)
            label = "numpy BLAS f32 (peer)" if qtype == "f32" else f"dllama {qtype}"
            shape = f"{rows}x{cols}" + (f" @{n}" if n > 1 else "")
            print(f"{shape:<12} {threads:>2}  {label:<22} {sec * 1e3:8.3f} ms "
                  f"{nbytes / sec / 1e9:7.2f} GB/s {q40_bytes / sec / 1e9:8.2f} {nbytes / best / 1e9:8.2f} GB/s",
                  flush=True)
            del copies


def asm_report():
    """The vector instructions of each block kernel's hot loop (the basic block with the most
    packed multiplies), compiled afresh: numba cannot show the assembly of cached code."""
    import collections
    import re

    import dllama.kernels as K

    for qtype in ("q40", "q41", "q80", "f16"):
        W = K.pack(qtype, random_raw(qtype, 64, 64, np.random.default_rng(0)), 64, 64)
        for n, form in ((1, "matrix-vector"), (2, "batch")):
            K.matmul(W, np.ones((n, 64), np.float32), np.empty((n, 64), np.float32))
            fn = W.kernels[n > 1][0] if qtype != "f16" else W.kernels[0]
            asm = next(iter(fn.inspect_asm().values()))
            pattern = r"vfmadd\w*ps|vmulps" if qtype == "f16" else r"vpmullw|vpmaddwd|vpmaddubsw|vpmulld"
            hot = max(re.split(r"\n(?=\.LBB)", asm), key=lambda b: len(re.findall(pattern, b)))
            regs = collections.Counter(re.findall(r"%(zmm|ymm|xmm)", hot))
            ops = collections.Counter(re.findall(r"^\s+(v\w+)\s", hot, re.M)).most_common(6)
            print(f"{qtype} {form:<14} {fn.__name__:<18} registers {dict(regs)}  {' '.join(f'{o}x{c}' for o, c in ops)}")


def arm_report():
    """Instruction mix of the hot kernels compiled for the Pi 5 (Cortex-A76, dotprod) and Pi 4 (A72):
    the most frequent vector instructions, and the scalar float arithmetic left (loop remainders)."""
    from dllama.kernels import _cross as X

    for cpu, features in (("cortex-a76", "+neon,+dotprod"), ("cortex-a72", "+neon")):
        for name in ("q4", "attention", "rmsnorm", "swiglu"):
            asm, symbol = X.target_asm(name, "aarch64-unknown-linux-gnu", cpu, features)
            mix = X.instruction_mix(X.function_body(asm, symbol))
            vec = sorted(((n, op) for (cls, op), n in mix.items() if cls == "vector"), reverse=True)[:7]
            scalar = sum(n for (cls, op), n in mix.items()
                         if cls == "fp-scalar" and op in ("fmul", "fadd", "fmadd", "fmla", "fdiv", "scvtf"))
            print(f"{cpu:<11} {name:<10} vector: {' '.join(f'{op}x{n}' for n, op in vec)}; "
                  f"scalar float arithmetic: {scalar}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32, help="also time a prompt batch of this many rows (1: skip)")
    ap.add_argument("--asm", action="store_true", help="show the hot loops' vector instructions instead")
    ap.add_argument("--arm", action="store_true", help="show what the hot kernels compile to on Raspberry Pis")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        arm_report()
        return 0
    if args.asm:
        if not os.environ.get("DLLAMA_BENCH_FRESH_CACHE"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, NUMBA_CACHE_DIR=tmp, DLLAMA_BENCH_FRESH_CACHE="1")
                return subprocess.run([sys.executable, __file__, "--asm"], env=env).returncode
        asm_report()
        return 0
    if args.child:
        child(args.child, args.repeat, args.batch)
        return 0
    print(f"{'matrix':<12} {'th':>2}  {'kernel':<22} {'median':>11} {'weights':>12} {'Q40-equiv':>8} {'best':>13}")
    for n in (int(t) for t in args.threads.split(",")):
        # BLAS reads its thread count once at start-up: one process per setting.
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n))
        subprocess.run([sys.executable, __file__, "--child", str(n), "--repeat", str(args.repeat),
                        "--batch", str(args.batch)],
                       env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
