"""Tensor parallelism on loopback: ms per generated token with its inference / transfer split.

    python bench/cluster.py [--repeats 3] [--steps 32] [--cpp-dllama /path/to/reference/dllama]

Configurations, run in rotation so that the shared machine's noise hits all of them, medians reported
(and the best run: on a shared machine noise only ever slows a run down):
1 node x 1 thread, 2 nodes x 1 thread each (a `dllama worker` on 127.0.0.1), 1 node x 2 threads. Model: random
weights in the shape of Llama 3.2 1B (dim 2048, 16 layers, 32/8 heads, FFN 8192, vocab 49152; Q40),
written once to bench/out/, with Q80 buffers: model B of ../shared/ANCHORS.md, whose figures for the C++
reference are printed beside ours (or measured in the same run with --cpp-dllama, a binary you built).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PROMPT = "Hello world"
CONFIGS = [("1 node x 1 thread", 1, 1), ("2 nodes x 1 thread", 2, 1), ("1 node x 2 threads", 1, 2)]
# ../shared/ANCHORS.md, model B, Distributed Llama C++ (Jan 2026), Q80 buffers: ms per token
ANCHOR_MS = {"1 node x 1 thread": "143-172", "2 nodes x 1 thread": "83-104 (T 8.5-23)",
             "1 node x 2 threads": "82-109"}


def ensure_model() -> tuple[Path, Path]:
    """bench/out/cluster_b.m (+ a byte-level .t): written once, atomically, by the project's writers."""
    from dllama.formats.dlt import TokenizerData, write_t
    from dllama.formats.random_model import preset_spec, write_random_model

    OUT.mkdir(exist_ok=True)
    m, t = OUT / "cluster_b.m", OUT / "cluster_b.t"
    spec = preset_spec("llama3_2_1b", "q40", vocab_size=49152)
    if not m.exists():
        print(f"writing {m} ...", file=sys.stderr)
        write_random_model(str(m), spec, seed=1)
    if not t.exists():
        tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>"]
        n = spec.vocab_size - len(tokens)
        tokens += [bytes([97 + i // 17576 % 26, 97 + i // 676 % 26, 97 + i // 26 % 26, 97 + i % 26]) for i in range(n)]
        write_t(str(t), TokenizerData(tokens, [0.0] * 258 + [-float(i) for i in range(n)], bos_id=256,
                                      eos_ids=[257], special_ids=frozenset({256, 257})))
    return m, t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    from dllama.errors import DllamaError
    from dllama.net import probe

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(port),
                             "--nthreads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            probe("127.0.0.1", port, 1.0)
            return proc, f"127.0.0.1:{port}"
        except DllamaError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("worker did not start")


def dllama_run(model: Path, tok: Path, threads: int, steps: int, workers: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dllama", "inference", "--model", str(model), "--tokenizer", str(tok),
           "--prompt", PROMPT, "--steps", str(steps), "--nthreads", str(threads), "--temperature", "0",
           "--buffer-float-type", "q80", "--max-seq-len", "256", "--json"]
    if workers:
        cmd += ["--workers", *workers]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ECHO_WORKER = r"""
import os, socket, sys
import numpy as np
from dllama.net.exchange import WorkerCollective
from dllama.net.transport import Connection, configure
index, n_nodes, dim, n_layers, vocab_part, port = map(int, sys.argv[1:7])
s = socket.create_connection(("127.0.0.1", port)); configure(s)
coll = WorkerCollective(Connection(s, "root", None), index, n_nodes, dim, 1, vocab_part, sys.argv[7])
x, part = np.zeros((1, dim), np.float32), np.zeros((1, vocab_part), np.float32)
cpu = None
while coll.step() is not None:
    if cpu is None:   # from the first token on: imports and compilation are not the exchange's
        cpu = sum(os.times()[:2])
    for _ in range(2 * n_layers):
        coll.broadcast(x); coll.reduce_sum(x)
    coll.broadcast(x); coll.gather(part, None)
print(sum(os.times()[:2]) - cpu, flush=True)
"""


def exchange_only(ftype: str, n_nodes=2, dim=2048, n_layers=16, vocab=49152, tokens=200) -> dict:
    """The wire's share alone: a token's exchanges (2 per layer, then the logits) between a root and
    n_nodes - 1 processes that compute nothing. Returns ms per token (median, 10th percentile), the
    per-exchange overhead that implies (median over 2 * n_layers + 1 round trips), and CPU us per
    exchange summed over all processes (what a loaded machine cannot hide)."""
    import numpy as np

    from dllama.model.partition import NodeSlice
    from dllama.net.exchange import RootCollective
    from dllama.net.transport import Connection, configure

    part_cols = vocab // n_nodes
    plan = [NodeSlice(i, n_nodes, range(0), range(0), range(0), range(i * part_cols, (i + 1) * part_cols))
            for i in range(n_nodes)]
    echoes, conns = [], []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for i in range(1, n_nodes):
            echoes.append(subprocess.Popen([sys.executable, "-c", ECHO_WORKER, str(i), str(n_nodes), str(dim),
                                            str(n_layers), str(part_cols), str(port), ftype],
                                           stdout=subprocess.PIPE, text=True))
            sock, _ = listener.accept()
            configure(sock)
            conns.append(Connection(sock, f"echo worker {i}", 30))
    root = RootCollective(conns, plan, dim, 1, ftype)
    x, y = np.random.default_rng(0).standard_normal((2, 1, dim), dtype=np.float32)
    logits, part = np.zeros((1, vocab), np.float32), np.zeros((1, part_cols), np.float32)
    positions = np.zeros(1, np.int64)
    times = []
    for i in range(tokens + 1):
        if i == 1:
            cpu = time.process_time()
        t0 = time.perf_counter()
        positions[0] = i
        root.step(1, positions)
        for _ in range(2 * n_layers):
            root.broadcast(x)
            root.reduce_sum(y)
        root.broadcast(x)
        root.gather(part, logits)
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu
    root.close()
    for echo in echoes:
        cpu += float(echo.communicate(timeout=30)[0].split()[-1])
    times = sorted(times[1:])
    exchanges = 2 * n_layers + 1
    return {"ms_per_token": 1000 * statistics.median(times), "ms_per_token_p10": 1000 * times[len(times) // 10],
            "us_per_exchange": 1e6 * statistics.median(times) / exchanges,
            "cpu_us_per_exchange": 1e6 * cpu / tokens / exchanges}


def cpp_run(binary: str, model: Path, tok: Path, threads: int, steps: int, nodes: int) -> dict:
    """The C++ reference: its root, plus a worker of its own for 2 nodes. Parses its summary lines."""
    worker, workers = None, []
    if nodes == 2:
        port = free_port()
        worker = subprocess.Popen([binary, "worker", "--port", str(port), "--nthreads", str(threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        workers = ["--workers", f"127.0.0.1:{port}"]
    try:
        out = subprocess.run([binary, "inference", "--model", str(model), "--tokenizer", str(tok),
                              "--buffer-float-type", "q80", "--prompt", PROMPT, "--steps", str(steps),
                              "--nthreads", str(threads), "--max-seq-len", "256", *workers],
                             capture_output=True, text=True, check=True, timeout=600)
    finally:
        if worker:
            worker.send_signal(signal.SIGINT)
            worker.wait(10)
    rates = re.findall(r"tokens/s:\s*([\d.]+)", out.stdout)
    return {"avg_token_ms": 1000 / float(rates[-1])}


def print_exchange_only(ftype: str, n_nodes: int = 2, tokens: int = 200) -> dict:
    r = exchange_only(ftype, n_nodes, tokens=tokens)
    print(f"exchanges alone, {n_nodes} processes computing nothing, {ftype} buffers: {r['ms_per_token']:.2f} "
          f"ms/token (median of {tokens}; p10 {r['ms_per_token_p10']:.2f}) = {r['us_per_exchange']:.0f} us per "
          f"exchange, {r['cpu_us_per_exchange']:.0f} us CPU per exchange (all processes)")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--cpp-dllama", default=None, help="the C++ reference's dllama binary, to run beside ours")
    args = ap.parse_args()
    model, tok = ensure_model()
    runs = {name: [] for name, _, _ in CONFIGS}
    cpp = {name: [] for name, _, _ in CONFIGS}
    worker, address = start_worker(1)
    try:
        for r in range(args.repeats):
            for name, nodes, threads in CONFIGS:
                res = dllama_run(model, tok, threads, args.steps, [address] if nodes == 2 else [])
                runs[name].append(res)
                print(f"run {r + 1} {name}: {res['avg_token_ms']:.1f} ms/token "
                      f"(I {res['avg_inference_ms']:.1f} T {res['avg_transfer_ms']:.1f})", file=sys.stderr)
                if args.cpp_dllama:
                    cpp[name].append(cpp_run(args.cpp_dllama, model, tok, threads, args.steps, nodes))
    finally:
        worker.kill()
        worker.wait(10)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for name, rs in runs.items()}
    print(f"\nrandom Llama-3.2-1B-shaped Q40, Q80 buffers, {args.steps} tokens, median of {args.repeats}")
    print(f"{'config':<22}{'ms/token':>10}{'I ms':>8}{'T ms':>8}{'T share':>9}{'sent kB':>9}{'recv kB':>9}"
          f"{'speedup':>9}{'best':>8}   C++ reference ms/token")
    base = med[CONFIGS[0][0]]["avg_token_ms"]
    for name, _, _ in CONFIGS:
        m = med[name]
        ref = (f"{statistics.median(x['avg_token_ms'] for x in cpp[name]):.1f} (same run)" if cpp[name]
               else f"{ANCHOR_MS[name]} (ANCHORS.md)")
        print(f"{name:<22}{m['avg_token_ms']:>10.1f}{m['avg_inference_ms']:>8.1f}{m['avg_transfer_ms']:>8.1f}"
              f"{m['avg_transfer_ms'] / m['avg_token_ms']:>9.0%}{m['sent_bytes_per_token'] / 1024:>9.1f}"
              f"{m['recv_bytes_per_token'] / 1024:>9.1f}{base / m['avg_token_ms']:>8.2f}x"
              f"{min(x['avg_token_ms'] for x in runs[name]):>8.1f}   {ref}")
    for ftype in ("q80", "f32"):
        print_exchange_only(ftype)
    print(json.dumps({"medians": med}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
