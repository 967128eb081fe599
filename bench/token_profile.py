"""Where one generated token's time goes, measured in one process: each kernel's share, the Python between
the kernels, and how fast the block matmul is on weights in cache (its arithmetic) against weights streamed
from memory (what a forward pass does).

    python bench/token_profile.py [--model bench/out/b1.m] [--threads 1] [--tokens 16] [--at 128]

The model's tokenizer is the file beside it with the suffix .t (bench/engine.py writes b1.m and b1.t; a GGUF
needs none). Tokens are decoded one by one from position --at (the KV cache below it holds zeros: only the
time means anything). The kernel split wraps each kernel entry point of dllama.kernels with a clock, so the
instrumented token is slightly slower than the plain one; what the wrappers add is counted as "between
kernels". The streaming figures rotate through copies of the matrices larger than the L3, as a forward pass
reads each weight once. One thread cannot keep the memory busy while it computes: if streaming took
max(read, arithmetic) it would reach the read bandwidth, if read + arithmetic one after the other it would
reach 1 / (1 / bandwidth + 1 / in-cache speed); the line "overlap model" prints the latter beside what was
measured.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
KERNELS = ("matmul", "rmsnorm", "rope_qkv", "attention", "swiglu", "gelu_glu")


def decode_times(model, n: int, at: int) -> list:
    tok = np.array([1], np.int64)
    times = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        model.forward(tok, np.array([at + i], np.int64))
        times.append(time.perf_counter_ns() - t0)
    return times


def kernel_split(engine, n: int, at: int) -> None:
    """ms per token of each kernel (matmul by matrix shape) and of everything between them."""
    import dllama.kernels as K

    spent = collections.Counter()
    originals = {name: getattr(K, name) for name in KERNELS}

    def clocked(name, fn):
        def call(*args, **kw):
            t0 = time.perf_counter_ns()
            fn(*args, **kw)
            key = f"matmul {args[0].rows}x{args[0].cols}" if name == "matmul" else name
            spent[key] += time.perf_counter_ns() - t0
        return call

    plain = decode_times(engine.model, n, at)
    try:
        for name, fn in originals.items():
            setattr(K, name, clocked(name, fn))
        timed = decode_times(engine.model, n, at + n)
    finally:
        for name, fn in originals.items():
            setattr(K, name, fn)
    total = sum(timed)
    print(f"ms per token: {np.median(plain) / 1e6:.2f} plain, {np.median(timed) / 1e6:.2f} instrumented "
          f"(medians of {n})")
    for key, ns in spent.most_common():
        print(f"  {key:22} {ns / n / 1e6:8.3f} ms  {100 * ns / total:5.1f}%")
    between = total - sum(spent.values())
    print(f"  {'between kernels':22} {between / n / 1e6:8.3f} ms  {100 * between / total:5.1f}%")


def matmul_speeds(qtype: str, threads: int, bandwidth: float) -> None:
    """GB/s of weight bytes through one block matmul: in cache (best of many calls on a matrix of ~1 MB)
    and streamed (copies rotated past the L3), for the 1B shape's two matrix forms."""
    import dllama.kernels as K
    from kernels import random_raw  # noqa: E402  (bench-local)

    rng = np.random.default_rng(0)
    for rows, cols in ((16384, 2048), (2048, 8192)):
        x = rng.standard_normal((1, cols), np.float32)
        hot_rows = max(64, (1 << 20) // (cols // 32 * 18) // 64 * 64)
        small = K.pack(qtype, random_raw(qtype, hot_rows, cols, rng), hot_rows, cols)
        out = np.empty((1, hot_rows), np.float32)
        K.matmul(small, x, out)
        best = 0.0
        for _ in range(200):
            t0 = time.perf_counter()
            K.matmul(small, x, out)
            best = max(best, small.nbytes / (time.perf_counter() - t0) / 1e9)
        raw = random_raw(qtype, rows, cols, rng)
        first = K.pack(qtype, raw, rows, cols)
        copies = [first] + [K.pack(qtype, raw.copy(), rows, cols) for _ in range((200 << 20) // first.nbytes)]
        out = np.empty((1, rows), np.float32)
        K.matmul(first, x, out)
        rates = []
        for _ in range(5):
            t0 = time.perf_counter()
            for W in copies:
                K.matmul(W, x, out)
            rates.append(len(copies) * first.nbytes / (time.perf_counter() - t0) / 1e9)
        model = 1 / (1 / bandwidth + 1 / best)
        print(f"  {qtype} {rows}x{cols}, {threads} thread(s): in cache {best:.1f} GB/s, streamed "
              f"{np.median(rates):.1f} (best {max(rates):.1f}); overlap model {model:.1f} GB/s "
              f"= {100 * model / bandwidth:.0f}% of the read bandwidth")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(os.environ.get("DLLAMA_BENCH_OUT") or HERE / "out") / "b1.m"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--at", type=int, default=128, help="position of the first decoded token")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from engine import read_bandwidth_gbs  # noqa: E402  (bench-local)

    from dllama.engine import Engine

    tokenizer = None if args.model.endswith(".gguf") else str(Path(args.model).with_suffix(".t"))
    engine = Engine.open(args.model, tokenizer, nthreads=args.threads, max_seq_len=args.at + 2 * args.tokens + 8)
    decode_times(engine.model, 2, args.at)   # first touches of the KV cache and the caches
    kernel_split(engine, args.tokens, args.at)
    qtypes = sorted({t.qtype for t in engine.loaded.tensors.values() if len(t.shape) == 2} & {"q40", "q41", "q80"})
    engine.close()
    bandwidth = read_bandwidth_gbs(args.threads)
    print(f"read bandwidth, {args.threads} thread(s): {bandwidth:.1f} GB/s")
    for qtype in qtypes:
        matmul_speeds(qtype, args.threads, bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
