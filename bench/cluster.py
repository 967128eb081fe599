"""Tensor parallelism between processes: ms per generated token with its inference / transfer split.

    python bench/cluster.py [--repeats 3] [--steps 32] [--link loopback|shaped|both] [--cpp-dllama BIN]
                            [--pin] [--compare-env KEY=VALUE ...]
    python bench/cluster.py --exchanges-only [--nodes 2,4] [--link loopback|shaped|both]

Configurations, run in rotation so that the shared machine's noise hits all of them, medians reported
(and the best run: on a shared machine noise only ever slows a run down): 1 node x 1 thread, 2 nodes x 1
thread each (a `dllama worker` on 127.0.0.1; with --link shaped also one in a network namespace behind a
link shaped like a home gigabit switch, bench/netns.py, which needs root), 1 node x 2 threads. Greedy
decoding, Q80 buffers. Beside the root's compute (I) and exchange time (T), wI / wT are the worker's own,
from its TIMES frame. Model: bench/engine.py's b1, random weights in the shape of Llama 3.2 1B (dim 2048,
16 layers, 32/8 heads, FFN 8192, vocab 49152; Q40): model B of ../shared/ANCHORS.md, whose figures for the
C++ reference are printed beside ours (or measured in the same run with --cpp-dllama, a binary you built).
--pin runs the root on core 0 and the worker on core 1 (`taskset`; also through the shaped link, where a
delay line's directions run beside their senders); --compare-env
adds 2 nodes whose root and worker (one of its own) run with those variables set, on loopback and, with
--link shaped/both, through the link: `DLLAMA_SPIN_US=2000` (receives that spin before they sleep), or
`PYTHONPATH=<another checkout>` (its code), against the default in the same run.

"Exchanges alone": a root and workers that compute nothing run a token's exchanges (2 per layer and the
output layer's), so the time is the wire's and the Python around it; the per-exchange overhead is that
time over the exchanges. Through the shaped link, bench/cost_model.py's prediction is printed beside
what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Hello world"
CONFIGS = [("1 node x 1 thread", 1, 1), ("2 nodes x 1 thread", 2, 1), ("1 node x 2 threads", 1, 2)]
SHAPED = "2 nodes x 1 thread, shaped link"
PIN_ROOT, PIN_WORKER = ("taskset", "-c", "0"), ("taskset", "-c", "1")   # --pin
# ../shared/ANCHORS.md, model B, Distributed Llama C++ (Jan 2026), Q80 buffers: ms per token
ANCHOR_MS = {"1 node x 1 thread": "143-172", "2 nodes x 1 thread": "83-104 (T 8.5-23)",
             "1 node x 2 threads": "82-109", SHAPED: "-"}


def ensure_model() -> tuple[Path, Path]:
    """bench/engine.py's b1 (.m and its .t), written there once and shared."""
    sys.path.insert(0, str(HERE))
    from engine import ensure_b1  # noqa: E402  (bench-local)

    files = ensure_b1()
    return Path(files["m"]), Path(files["t"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int, link=None, prefix=(), env=None, port=9998) -> tuple[subprocess.Popen, str]:
    """A `dllama worker` on loopback (run under `prefix`, such as taskset), or inside the link's worker
    namespace (its readiness is read from its log there: nothing in this namespace may connect to the
    namespaces' addresses)."""
    if link is None:
        from dllama.errors import DllamaError
        from dllama.net import probe

        port = free_port()
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port",
                                 str(port), "--nthreads", str(threads)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        for _ in range(600):
            try:
                probe("127.0.0.1", port, 1.0)
                return proc, f"127.0.0.1:{port}"
            except DllamaError:
                time.sleep(0.1)
        proc.kill()
        raise RuntimeError("worker did not start")
    from netns import WORKER_ADDR

    proc = subprocess.Popen(link.worker([*prefix, sys.executable, "-m", "dllama", "worker", "--host", WORKER_ADDR,
                                         "--port", str(port), "--nthreads", str(threads),
                                         "--insecure"]),   # the link's namespaces are the bench's own
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "listening on" in line:
            # keep reading its log, or a full pipe would stall the worker
            import threading
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, f"{WORKER_ADDR}:{port}"
    raise RuntimeError("worker in the namespace did not start")


def dllama_run(model: Path, tok: Path, threads: int, steps: int, workers: list[str], link=None, prefix=(),
               env=None) -> dict:
    cmd = [*prefix, sys.executable, "-m", "dllama", "inference", "--model", str(model), "--tokenizer", str(tok),
           "--prompt", PROMPT, "--steps", str(steps), "--nthreads", str(threads), "--temperature", "0",
           "--buffer-float-type", "q80", "--max-seq-len", "256", "--json"]
    if workers:
        cmd += ["--workers", *workers]
    if link is not None:
        cmd = link.root(cmd)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


ECHO_WORKER = r"""
import os, socket, sys
import numpy as np
from dllama.net.exchange import WorkerCollective
from dllama.net.transport import Connection, configure
index, n_nodes, dim, n_layers, vocab_part, port = map(int, sys.argv[1:7])
s = socket.create_connection((sys.argv[8], port)); configure(s)
coll = WorkerCollective(Connection(s, "root", None), index, n_nodes, dim, 1, vocab_part, sys.argv[7],
                        index * vocab_part)
x, y = np.zeros((2, 1, dim), np.float32)   # y stays 0: a sum of partials that grew would overflow
part = np.random.default_rng(index).standard_normal((1, vocab_part), dtype=np.float32)
cpu = None
while coll.step() is not None:
    if cpu is None:   # from the first token on: imports and compilation are not the exchange's
        cpu = sum(os.times()[:2])
    coll.broadcast(x)
    for _ in range(2 * n_layers):
        coll.all_reduce(y)
    coll.gather(part, None)
print(sum(os.times()[:2]) - cpu, flush=True)
"""


def exchange_only(ftype: str, n_nodes=2, dim=2048, n_layers=16, vocab=49152, tokens=200, host="127.0.0.1",
                  worker_prefix=(), worker_host=None) -> dict:
    """The wire's share alone: a token's exchanges (2 per layer, then the output layer's, greedy as the
    engine at temperature 0: each worker's best token) between a root and n_nodes - 1 processes that
    compute nothing. Returns ms per token (median, 10th percentile), the per-exchange overhead that
    implies (the median over 2 * n_layers + 1 exchanges: the all-reduces and the last answer), CPU us per
    exchange summed over all processes (what a loaded machine cannot hide), and the root's bytes per token."""
    import numpy as np

    from dllama.model.collective import LOGITS_TOP
    from dllama.model.partition import NodeSlice
    from dllama.net.exchange import RootCollective
    from dllama.net.transport import Connection, configure

    part_cols = vocab // n_nodes
    plan = [NodeSlice(i, n_nodes, range(0), range(0), range(0), range(i * part_cols, (i + 1) * part_cols))
            for i in range(n_nodes)]
    echoes, conns = [], []
    with socket.create_server((host, 0)) as listener:
        port = listener.getsockname()[1]
        for i in range(1, n_nodes):
            echoes.append(subprocess.Popen([*worker_prefix, sys.executable, "-c", ECHO_WORKER, str(i),
                                            str(n_nodes), str(dim), str(n_layers), str(part_cols), str(port),
                                            ftype, worker_host or host], stdout=subprocess.PIPE, text=True))
            sock, _ = listener.accept()
            configure(sock)
            conns.append(Connection(sock, f"echo worker {i}", 30))
    root = RootCollective(conns, plan, dim, 1, ftype)
    x, y = np.random.default_rng(0).standard_normal((1, dim), dtype=np.float32), np.zeros((1, dim), np.float32)
    logits, part = np.zeros((1, vocab), np.float32), np.zeros((1, part_cols), np.float32)
    positions = np.zeros(1, np.int64)
    greedy = (LOGITS_TOP, 0.0, 1)
    times = []
    for i in range(tokens + 1):
        if i == 1:
            cpu, sent, recv = time.process_time(), root.sent_bytes, root.recv_bytes
        t0 = time.perf_counter()
        positions[0] = i
        root.step(1, positions, greedy)
        root.broadcast(x)
        for _ in range(2 * n_layers):
            root.all_reduce(y)
        root.gather(part, logits).greedy()
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu
    sent, recv = root.sent_bytes - sent, root.recv_bytes - recv
    root.close()
    for echo in echoes:
        cpu += float(echo.communicate(timeout=30)[0].split()[-1])
    times = sorted(times[1:])
    exchanges = 2 * n_layers + 1
    return {"ms_per_token": 1000 * statistics.median(times), "ms_per_token_p10": 1000 * times[len(times) // 10],
            "us_per_exchange": 1e6 * statistics.median(times) / exchanges,
            "cpu_us_per_exchange": 1e6 * cpu / tokens / exchanges,
            "sent_bytes_per_token": sent / tokens, "recv_bytes_per_token": recv / tokens}


def exchange_only_shaped(link, ftype: str, n_nodes: int, tokens: int, pin: bool = False) -> dict:
    """exchange_only with the root in the link's root namespace and the echo workers in the other (with
    pin, the root on core 0 and the workers on core 1)."""
    from netns import ROOT_ADDR

    root_pin, worker_pin = (PIN_ROOT, PIN_WORKER) if pin else ((), ())
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import cluster; "
            f"print(json.dumps(cluster.exchange_only({ftype!r}, {n_nodes}, tokens={tokens}, host={ROOT_ADDR!r}, "
            f"worker_prefix={link.worker([*worker_pin])!r})))")
    out = subprocess.run(link.root([*root_pin, sys.executable, "-c", code]), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def print_exchange_only(ftype: str, n_nodes: int, tokens: int, link=None, pin: bool = False) -> dict:
    if link is None:
        r = exchange_only(ftype, n_nodes, tokens=tokens, worker_prefix=PIN_WORKER if pin else ())
    else:
        r = exchange_only_shaped(link, ftype, n_nodes, tokens, pin)
    where = "loopback" if link is None else f"shaped link ({link.qdisc})"
    print(f"exchanges alone, {where}, {n_nodes} processes computing nothing, {ftype} buffers: "
          f"{r['ms_per_token']:.2f} ms/token (median of {tokens}; p10 {r['ms_per_token_p10']:.2f}) = "
          f"{r['us_per_exchange']:.0f} us per exchange, {r['cpu_us_per_exchange']:.0f} us CPU per exchange "
          f"(all processes); root sends {r['sent_bytes_per_token'] / 1e3:.1f} kB, receives "
          f"{r['recv_bytes_per_token'] / 1e3:.1f} kB per token")
    return r


def exchanges_only(args) -> None:
    """Exchanges alone on loopback and, with --link shaped/both, through the shaped link beside the cost
    model's prediction from the loopback overhead."""
    import cost_model

    loop = {}
    cores = os.sched_getaffinity(0)
    if args.pin:   # the loopback root is this process
        os.sched_setaffinity(0, {0})
    try:
        for n in args.nodes:
            if args.link in ("loopback", "both") or n not in loop:
                loop[n] = print_exchange_only("q80", n, args.tokens, pin=args.pin)
            if args.link in ("loopback", "both") and n == 2:
                print_exchange_only("f32", n, args.tokens, pin=args.pin)
    finally:
        os.sched_setaffinity(0, cores)
    if args.link == "loopback":
        return
    from netns import Link

    cpus = (0, 1) if args.pin else None
    with Link(cpus=cpus) as link, contextlib.ExitStack() as stack:
        # what the delay line costs by itself (its wake-ups and copies, which a wire has not)
        bare = (stack.enter_context(Link(delay_line=True, delay_s=0.0, tag="z", cpus=cpus)) if link.is_delay_line
                else None)
        rtt = 2 * link.delay_s
        for n in args.nodes:
            if n != 2:
                continue   # the namespaces hold one worker
            got = print_exchange_only("q80", n, args.tokens, link, args.pin)
            if bare is not None:
                print_exchange_only("q80", n, args.tokens, bare, args.pin)
            dim, n_layers, vocab = cost_model.SHAPES["1B shape (b1)"]
            overhead = loop[n]["us_per_exchange"] * 1e-6
            c = cost_model.components(dim, n_layers, vocab, n, overhead, rtt, 1e9, link.per_segment)
            print(f"  cost model, ms/token: overhead {1e3 * c['overhead']:.2f} (the loopback's {overhead * 1e6:.0f} us "
                  f"per exchange) + latency {1e3 * c['latency']:.2f} (RTT {rtt * 1e3:.2f} ms) + wire "
                  f"{1e3 * c['wire']:.2f} (1 Gbit/s, {link.per_segment} B of headers a segment) = "
                  f"{1e3 * sum(c.values()):.2f} predicted; {got['ms_per_token']:.2f} measured")
            if not link.delay_s:
                print("  (a token bucket delays no packet while its average stays under the rate, so without "
                      "netem the wire term is not expected in the measurement either: it and the latency are "
                      "the model's alone)")
    for each in (link, bare):
        if each is not None and each.lateness():
            print(f"  {each.lateness()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--link", choices=("loopback", "shaped", "both"), default="loopback",
                    help="shaped/both: also through a shaped link between two network namespaces (needs root)")
    ap.add_argument("--exchanges-only", action="store_true", help="only the exchanges alone (no model)")
    ap.add_argument("--nodes", default="2", help="exchanges alone: node counts, comma-separated (default 2)")
    ap.add_argument("--tokens", type=int, default=200, help="exchanges alone: tokens per measurement")
    ap.add_argument("--cpp-dllama", default=None, help="the C++ reference's dllama binary, to run beside ours")
    ap.add_argument("--pin", action="store_true", help="root on core 0, worker on core 1 (taskset)")
    ap.add_argument("--compare-env", nargs="+", default=None, metavar="KEY=VALUE",
                    help="also 2 nodes x 1 thread with these variables set in the root and its worker")
    args = ap.parse_args()
    args.nodes = [int(n) for n in args.nodes.split(",")]
    if args.compare_env and not all(re.fullmatch(r"[A-Za-z_]\w*=.*", kv) for kv in args.compare_env):
        ap.error("--compare-env: each must be KEY=VALUE")
    sys.path.insert(0, str(HERE))
    print(f"load average at the start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    if args.exchanges_only:
        exchanges_only(args)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        return 0
    from netns import Link

    model, tok = ensure_model()
    configs = [c for c in CONFIGS if args.link != "shaped" or c[1] == 1] if args.link != "loopback" else CONFIGS
    configs = configs + ([(SHAPED, 2, 1)] if args.link != "loopback" else [])
    other_env, other, shaped_other = None, None, None
    if args.compare_env:
        other_env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.compare_env))
        if args.link != "shaped":
            other = "2 nodes x 1 thread, " + " ".join(args.compare_env)
            configs = configs[:2] + [(other, 2, 1)] + configs[2:]
        if args.link != "loopback":
            shaped_other = SHAPED + ", " + " ".join(args.compare_env)
            configs.append((shaped_other, 2, 1))
        ANCHOR_MS.update({name: "-" for name in (other, shaped_other) if name})
    root_pin, worker_pin = (PIN_ROOT, PIN_WORKER) if args.pin else ((), ())
    runs = {name: [] for name, _, _ in configs}
    cpp = {name: [] for name, _, _ in configs}
    # a delay line's directions run where their senders do: the root's on core 0, the worker's on core 1
    link = Link(cpus=(0, 1) if args.pin else None).__enter__() if args.link != "loopback" else None
    workers = {}
    try:
        if args.link != "shaped":
            workers["loopback"] = start_worker(1, prefix=worker_pin)
        if other_env is not None:
            workers[other] = start_worker(1, prefix=worker_pin, env=other_env)
        if link is not None:
            workers[SHAPED] = start_worker(1, link, prefix=worker_pin)
        if link is not None and shaped_other is not None:
            workers[shaped_other] = start_worker(1, link, prefix=worker_pin, env=other_env, port=9997)
        for r in range(args.repeats):
            for name, nodes, threads in configs:
                shaped = name in (SHAPED, shaped_other)
                which = name if shaped or name == other else "loopback"
                address = [workers[which][1]] if nodes == 2 else []
                res = dllama_run(model, tok, threads, args.steps, address, link if shaped else None,
                                 root_pin if threads == 1 else (), other_env if name in (other, shaped_other) else None)
                runs[name].append(res)
                print(f"run {r + 1} {name}: {res['avg_token_ms']:.1f} ms/token "
                      f"(I {res['avg_inference_ms']:.1f} T {res['avg_transfer_ms']:.1f})", file=sys.stderr)
                if args.cpp_dllama and not shaped and name != other:
                    cpp[name].append(cpp_run(args.cpp_dllama, model, tok, threads, args.steps, nodes))
    finally:
        for proc, _ in workers.values():
            proc.kill()
            proc.wait(10)
        if link is not None:
            link.close()
    print_table(runs, cpp, configs, args)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if link is not None:
        print(f"shaped link: {link.qdisc}" + (f"\n  {link.lateness()}" if link.lateness() else ""))
    return 0


def print_table(runs: dict, cpp: dict, configs: list, args) -> None:
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for name, rs in runs.items()}
    print(f"\nrandom Llama-3.2-1B-shaped Q40, Q80 buffers, greedy, {args.steps} tokens, median of {args.repeats}")
    width = max(34, *(len(name) + 2 for name, _, _ in configs))
    print(f"{'config':<{width}}{'ms/token':>10}{'I ms':>8}{'T ms':>8}{'T share':>9}{'wI ms':>7}{'wT ms':>7}"
          f"{'sent kB':>9}{'recv kB':>9}{'speedup':>9}{'best':>8}   C++ reference ms/token")
    base = med[configs[0][0]]["avg_token_ms"]
    for name, _, _ in configs:
        m = med[name]
        ref = (f"{statistics.median(x['avg_token_ms'] for x in cpp[name]):.1f} (same run)" if cpp[name]
               else f"{ANCHOR_MS[name]} (ANCHORS.md)")
        # the worker's own compute and exchange time per token (its TIMES frame), medians over the runs
        worker = [x["nodes"][1] for x in runs[name] if len(x.get("nodes", ())) > 1]
        w = "".join(f"{statistics.median(n[k] for n in worker):>7.1f}" if worker else f"{'-':>7}"
                    for k in ("inference_ms", "transfer_ms"))
        print(f"{name:<{width}}{m['avg_token_ms']:>10.1f}{m['avg_inference_ms']:>8.1f}{m['avg_transfer_ms']:>8.1f}"
              f"{m['avg_transfer_ms'] / m['avg_token_ms']:>9.0%}{w}{m['sent_bytes_per_token'] / 1024:>9.1f}"
              f"{m['recv_bytes_per_token'] / 1024:>9.1f}{base / m['avg_token_ms']:>8.2f}x"
              f"{min(x['avg_token_ms'] for x in runs[name]):>8.1f}   {ref}")
    print(json.dumps({"medians": med}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
