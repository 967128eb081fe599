"""Uneven machines: `--split auto` against the even split, on the 1B-shaped model, 1 thread per node.

    flock /work/bench.lock python bench/split.py [--steps 16] [--repeats 2] [--model M --tokenizer T]
        [--also2 2,1 ...] [--also3 2,1,1 ...] [--cpu-shares 16384]

Two scenarios, each node pinned with `taskset`:
  2 nodes: the root alone on core 0; the worker on core 1, sharing it with a CPU-bound process (a busy
           loop), so the worker runs at about half speed;
  3 nodes: the root alone on core 0; both workers on core 1.
For each, even, auto and any hand splits run in rotation (medians and best of the repeats; the machine is
shared, so noise only slows a run down), with the root's wait on the network per token, and the plan auto
chose is printed with the speeds the nodes measured.
`--cpu-shares N` (root): run in a cpu cgroup of that weight (v1 cpu.shares; default groups weigh 1024).
With autogroup scheduling on (Linux's default for sessions), `nice` only ranks processes within their
session: another session's nice-19 test run still takes an equal share of each core, and "the root alone
on core 0" is not. Loopback only. The model is bench/engine.py's b1 (or --model); the machine's load
average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cluster import PROMPT, ensure_model, start_worker  # noqa: E402  (bench-local)

BUSY = "while True: pass"


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def run_root(model: Path, tok: Path, steps: int, workers: list[str], split: str | None) -> tuple[dict, str]:
    cmd = pinned(0, [sys.executable, "-m", "dllama", "inference", "--model", str(model), "--tokenizer", str(tok),
                     "--prompt", PROMPT, "--steps", str(steps), "--nthreads", "1", "--temperature", "0",
                     "--buffer-float-type", "q80", "--max-seq-len", "256", "--json", "--workers", *workers])
    if split:
        cmd += ["--split", split]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def scenario(name: str, model: Path, tok: Path, worker_cores: list[int], busy_cores: list[int], steps: int,
             repeats: int, also=()) -> dict:
    procs = [subprocess.Popen(pinned(c, [sys.executable, "-c", BUSY])) for c in busy_cores]
    workers = [start_worker(1, prefix=pinned(c, [])) for c in worker_cores]
    addresses = [a for _, a in workers]
    splits = ["even", "auto", *also]
    results: dict[str, list[float]] = {k: [] for k in splits}
    waits: dict[str, list[float]] = {k: [] for k in splits}
    plan = ""
    try:
        run_root(model, tok, 2, addresses, None)   # page cache and kernels warm for both
        for _ in range(repeats):
            for split in splits:
                summary, err = run_root(model, tok, steps, addresses, None if split == "even" else split)
                results[split].append(summary["generation_tokens_per_s"])
                waits[split].append(summary["avg_transfer_ms"])
                if split == "auto":
                    plan = "\n".join(line for line in err.splitlines() if line.startswith(("split by", "  node")))
    finally:
        for p, _ in workers:
            p.terminate()
        for p in procs:
            p.terminate()
        for p in [*procs, *(w for w, _ in workers)]:
            p.wait(10)
    med = {k: statistics.median(v) for k, v in results.items()}
    best = {k: max(v) for k, v in results.items()}
    print(f"\n== {name}")
    print(plan)
    for k in splits:
        # the root's wait on the network per token: where the split is off, the wait for the slowest worker
        print(f"  {k:5s}: {med[k]:.2f} tokens/s median, {best[k]:.2f} best, root waits "
              f"{statistics.median(waits[k]):.1f} ms/token  (runs: {', '.join(f'{x:.2f}' for x in results[k])})")
    print(f"  auto / even: {med['auto'] / med['even']:.2f}x median, {best['auto'] / best['even']:.2f}x best")
    return {"name": name, "runs": results, "plan": plan}


@contextlib.contextmanager
def cpu_group(shares: int | None):
    """This process (and what it starts) in a cpu cgroup weighing `shares`, removed afterwards."""
    if not shares:
        yield
        return
    group = Path(f"/sys/fs/cgroup/cpu/dllama-bench-{os.getpid()}")
    group.mkdir()
    try:
        (group / "cpu.shares").write_text(str(shares))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        yield
    finally:
        (group.parent / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model")
    p.add_argument("--tokenizer")
    p.add_argument("--only", choices=("2", "3"))
    p.add_argument("--also2", nargs="*", default=[], metavar="W0,W1", help="hand splits to run beside even and auto "
                   "in the 2-node scenario (where the best split lies)")
    p.add_argument("--also3", nargs="*", default=[], metavar="W0,W1,W2", help="the same for 3 nodes")
    p.add_argument("--cpu-shares", type=int, default=None, help="run in a cpu cgroup (v1) of this weight")
    args = p.parse_args()
    with cpu_group(args.cpu_shares):
        return run(args)


def run(args) -> int:
    model, tok = (Path(args.model), Path(args.tokenizer)) if args.model else ensure_model()
    if os.cpu_count() < 2:
        print("needs 2 cores", file=sys.stderr)
        return 1
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    if args.only != "3":
        scenario("2 nodes: root alone on core 0; worker on core 1 with a busy loop", model, tok, [1], [1],
                 args.steps, args.repeats, args.also2)
    if args.only != "2":
        scenario("3 nodes: root alone on core 0; both workers on core 1", model, tok, [1, 1], [], args.steps,
                 args.repeats, args.also3)
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
