"""Continuous batching: aggregate tokens/s of 1 vs N concurrent streams, and the time to first token of a
short request arriving while N long ones generate, against an idle engine.

    flock /work/bench.lock python bench/serve.py --model /work/models/b1.gguf [--threads 1,2]
          [--streams 1,4] [--tokens 32] [--prompt-tokens 16] [--repeats 3] [--workers 1 [--logits top,full]]

Drives the engine and the scheduler (dllama.batcher) directly, as the API's engine thread does, without
HTTP: what is measured is the forward passes. Greedy sampling; every stream has its own prompt. The stream
counts alternate, `--repeats` rounds, and the medians are printed (noise on a shared host hits all of them):
one JSON line per thread count.

`--workers N` runs the root with N `dllama worker`s on 127.0.0.1, each with the root's thread count, and
`--logits` says how each batched pass ends there, alternating in the same rounds (in reverse order every
other round): "top" (each row's top candidates, dllama.candidates) and "full" (every row's logits
gathered, what a sampler that needs them costs); the bytes the root receives per decode pass are printed
beside the tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def _greedy(logits) -> int:
    """Greedy over the full logits: having no `wants`, it makes a cluster gather every row's logits."""
    return int(np.argmax(logits))


def _sampler(logits: str):
    from dllama.sampler import Sampler

    return Sampler(0.0) if logits == "top" else _greedy


def _prompts(engine, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    vocab = engine.spec.vocab_size
    return [rng.integers(100, min(vocab, 30000), length).tolist() for _ in range(n)]


def aggregate(engine, streams: int, tokens: int, prompt_tokens: int, logits: str = "top") -> dict:
    """`streams` requests started together, `tokens` each; tokens/s of their decode passes together."""
    from dllama.batcher import Batcher, Sequence

    b = Batcher(engine)
    seqs = [Sequence(p, tokens, _sampler(logits)) for p in _prompts(engine, streams, prompt_tokens)]
    for s in seqs:
        b.admit(s)
    while any(s.todo for s in seqs):   # the prompts first: the figure is of decoding
        b.step()
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    r0, p0 = engine.coll.recv_bytes, b.passes
    while b.running:
        n += len(b.step())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_pass = (engine.coll.recv_bytes - r0) / max(b.passes - p0, 1)
    for s in seqs:
        engine.release(s.slot)
    # tokens per CPU second: at one thread, what the wall figure would be on an idle core (a shared host
    # takes the core away between time slices; CPU time does not count those gaps)
    return {"streams": streams, "tokens": n, "seconds": round(dt, 3), "tok_s": round(n / dt, 2),
            "cpu_tok_s": round(n / cpu, 2), "recv_bytes_per_pass": round(per_pass)}


def ttft(engine, busy: int, tokens: int, prompt_tokens: int, seed: int) -> float:
    """Seconds from a short request's arrival to its first token while `busy` long ones decode. Prompts
    are new for every `seed`: no slot's cache holds any of them."""
    from dllama.batcher import Batcher, Sequence

    b = Batcher(engine)
    prompts = _prompts(engine, busy + 1, prompt_tokens, seed)
    long = [Sequence(p, 10 ** 6, _greedy) for p in prompts[:busy]]
    for s in long:
        b.admit(s)
    for _ in range(prompt_tokens // 8 + 3):   # the long ones are past their prompts, decoding
        b.step()
    short = Sequence(prompts[-1], 1, _greedy)
    short.t_submit = time.perf_counter()
    b.admit(short)
    while short.finish is None:
        b.step()
    for s in list(b.running):
        b.cancel(s)
    engine.release(short.slot)
    return short.t_first - short.t_submit


def _open(args, nt: int, streams: list[int]):
    """The engine at `nt` threads, with --workers local workers (returned, to stop) on loopback."""
    from cluster import start_worker   # bench/ is the script's directory, on sys.path
    from dllama.engine import Engine

    procs = []
    try:
        addrs = []
        for _ in range(args.workers):
            proc, addr = start_worker(nt)
            procs.append(proc)
            addrs.append(addr)
        engine = Engine.open(args.model, args.tokenizer, nthreads=nt, max_seq_len=args.max_seq_len,
                             parallel=max(streams) + 1, workers=addrs)
    except BaseException:
        _stop(procs)
        raise
    return engine, procs


def _stop(procs) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="local dllama workers on 127.0.0.1")
    ap.add_argument("--logits", default="top", help="top, full or both (top,full): how a cluster's passes end")
    args = ap.parse_args()

    streams = [int(s) for s in args.streams.split(",")]
    modes = args.logits.split(",")
    # one figure per stream count and way of ending a pass ("4", or "top 4" when both are measured)
    runs = [(m, s, str(s) if len(modes) == 1 else f"{m} {s}") for m in modes for s in streams]
    for nt in (int(t) for t in args.threads.split(",")):
        engine, procs = _open(args, nt, streams)
        try:
            aggregate(engine, 1, 4, args.prompt_tokens)   # warm up
            tok_s, cpu_tok_s, nbytes = ({key: [] for _, _, key in runs} for _ in range(3))
            idle, busy = [], []
            for rnd in range(args.repeats):
                for mode, s, key in (runs if rnd % 2 == 0 else runs[::-1]):   # A/B, then B/A
                    r = aggregate(engine, s, args.tokens, args.prompt_tokens, mode)
                    tok_s[key].append(r["tok_s"])
                    cpu_tok_s[key].append(r["cpu_tok_s"])
                    nbytes[key].append(r["recv_bytes_per_pass"])
                idle.append(ttft(engine, 0, args.tokens, args.prompt_tokens, seed=1000 + 2 * rnd))
                busy.append(ttft(engine, max(streams), args.tokens, args.prompt_tokens, seed=1001 + 2 * rnd))
            med = {k: statistics.median(v) for k, v in tok_s.items()}
            cpu_med = {k: statistics.median(v) for k, v in cpu_tok_s.items()}
            idle, busy = statistics.median(idle), statistics.median(busy)
            first = {m: [k for mm, _, k in runs if mm == m][0] for m in modes}
            print(json.dumps({"threads": nt, "workers": args.workers, "tok_s": med, "all_tok_s": tok_s,
                              "speedup": {k: round(med[k] / med[first[m]], 2) for m, _, k in runs},
                              "cpu_tok_s": cpu_med,
                              "cpu_speedup": {k: round(cpu_med[k] / cpu_med[first[m]], 2) for m, _, k in runs},
                              "recv_bytes_per_pass": {k: statistics.median(v) for k, v in nbytes.items()},
                              "ttft_idle_s": round(idle, 3), f"ttft_{max(streams)}_busy_s": round(busy, 3),
                              "ttft_ratio": round(busy / idle, 2),
                              "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
        finally:
            engine.close()
            _stop(procs)


if __name__ == "__main__":
    main()
