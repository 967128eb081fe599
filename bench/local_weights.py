"""Loading a worker: streamed from the root vs its local slice file (`dllama worker --weights`).

    python bench/local_weights.py --model /work/models/b1.m [--nodes 2] [--repeats 3]

Cuts the slices once (`dllama slice`, timed), then times `connect_workers` (handshake, CONFIG, weights,
the workers' READY) against real `dllama worker` processes on 127.0.0.1, streamed and local in rotation,
and prints the medians with the bytes of weights sent. Loopback is the streamed case's best: on a real
link add the slice's size over the link's rate (1 GbE: about 8 s per GB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "integration"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from cluster_fixtures import KEY, WorkerProcess   # the test suite's loopback worker, with its key

    from dllama.formats.loader import load_model
    from dllama.model.partition import partition
    from dllama.net.root import connect_workers
    from dllama.net.slicefile import slice_name

    tmp = tempfile.mkdtemp(prefix="dllama-localw-")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dllama", "slice", "--model", args.model, "--nodes", str(args.nodes),
                    "--out", tmp], check=True, stdout=subprocess.DEVNULL)
    print(f"dllama slice: {time.perf_counter() - t0:.1f} s for {args.nodes - 1} workers")
    files = [os.path.join(tmp, slice_name(i, args.nodes)) for i in range(1, args.nodes)]
    streamed = [WorkerProcess(Path(tmp)) for _ in files]
    local = [WorkerProcess(Path(tmp), args=["--weights", f]) for f in files]
    loaded = load_model(args.model)
    plan = partition(loaded.spec, args.nodes)
    times: dict[str, list[float]] = {"streamed": [], "local": []}
    try:
        for w in streamed + local:
            w.wait_ready()
        for _ in range(args.repeats):
            for kind, workers in (("streamed", streamed), ("local", local)):
                log: list[str] = []
                t0 = time.perf_counter()
                coll = connect_workers([w.address for w in workers], loaded, plan, 256, "q80", key=KEY,
                                       log=log.append)
                times[kind].append(time.perf_counter() - t0)
                coll.close()
                for w in workers:
                    w.wait_idle(30)
                print(f"{kind}: {times[kind][-1]:.2f} s; {[line for line in log if line.startswith('sent')][0]}")
    finally:
        for w in streamed + local:
            w.stop()
    size = sum(os.path.getsize(f) for f in files)
    shutil.rmtree(tmp)
    for kind, ts in times.items():
        print(f"{kind:9s} median {statistics.median(ts):.2f} s, best {min(ts):.2f} s "
              f"({size / 1e6:.0f} MB of slices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
