"""What a batched decode pass costs per matrix: time of an n-row Q40 x Q80 matmul against a 1-row one, on
the 1B shape's FFN matrix and output layer, at 1 thread (cold caches, as in a forward pass).

    nice python bench/batched_matmul.py [--rows 1,2,3,4,8] [--threads 1] [--repeat 15]

Continuous batching turns decode passes of 1 row into passes of one row per stream: if an n-row pass costs
c(n) x a 1-row pass, n streams get n / c(n) x the tokens/s of one. Medians; the ratio column is against
the 1-row median of the same matrix in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from kernels import ROTATE_BYTES, random_raw, timed   # bench/ is the script's directory, on sys.path

SHAPES = (("ffn_up 8192x2048", 8192, 2048), ("ffn_down 2048x8192", 2048, 8192), ("output 49152x2048", 49152, 2048))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    import dllama.kernels as K

    K.set_threads(args.threads)
    rng = np.random.default_rng(0)
    ns = [int(n) for n in args.rows.split(",")]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.threads} thread(s)")
    print(f"{'matrix':<20} {'rows':>4} {'median ms':>10} {'best ms':>9} {'x 1 row':>8}")
    for label, rows, cols in SHAPES:
        raw = random_raw("q40", rows, cols, rng)
        ncopies = max(2, -(-ROTATE_BYTES // raw.nbytes) + 1)
        copies = [K.pack("q40", raw.copy(), rows, cols) for _ in range(ncopies)]
        base = None
        for n in ns:
            x = rng.standard_normal((n, cols), np.float32)
            out = np.empty((n, rows), np.float32)
            sec, best = timed(lambda W: K.matmul(W, x, out), copies, args.repeat)
            base = base or sec
            print(f"{label:<20} {n:>4} {sec * 1e3:10.3f} {best * 1e3:9.3f} {sec / base:8.2f}", flush=True)
        del copies
    return 0


if __name__ == "__main__":
    sys.exit(main())
