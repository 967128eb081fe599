"""Continuous batching: aggregate tokens/s of 1 vs N concurrent streams, and the time to first token of a
short request arriving while N long ones generate, against an idle engine.

    flock /work/bench.lock python bench/serve.py --model /work/models/b1.gguf [--threads 1,2]
          [--streams 1,4] [--tokens 32] [--prompt-tokens 16] [--repeats 3]

Drives the engine and the scheduler (dllama.batcher) directly, as the API's engine thread does, without
HTTP: what is measured is the forward passes. Greedy sampling; every stream has its own prompt. The stream
counts alternate, `--repeats` rounds, and the medians are printed (noise on a shared host hits all of them):
one JSON line per thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _greedy(logits) -> int:
    return int(np.argmax(logits))


def _prompts(engine, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    vocab = engine.spec.vocab_size
    return [rng.integers(100, min(vocab, 30000), length).tolist() for _ in range(n)]


def aggregate(engine, streams: int, tokens: int, prompt_tokens: int) -> dict:
    """`streams` requests started together, `tokens` each; tokens/s of their decode passes together."""
    from dllama.batcher import Batcher, Sequence

    b = Batcher(engine)
    seqs = [Sequence(p, tokens, _greedy) for p in _prompts(engine, streams, prompt_tokens)]
    for s in seqs:
        b.admit(s)
    while any(s.todo for s in seqs):   # the prompts first: the figure is of decoding
        b.step()
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while b.running:
        n += len(b.step())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    for s in seqs:
        engine.release(s.slot)
    # tokens per CPU second: at one thread, what the wall figure would be on an idle core (a shared host
    # takes the core away between time slices; CPU time does not count those gaps)
    return {"streams": streams, "tokens": n, "seconds": round(dt, 3), "tok_s": round(n / dt, 2),
            "cpu_tok_s": round(n / cpu, 2)}


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
    args = ap.parse_args()
    from dllama.engine import Engine

    streams = [int(s) for s in args.streams.split(",")]
    for nt in (int(t) for t in args.threads.split(",")):
        engine = Engine.open(args.model, args.tokenizer, nthreads=nt, max_seq_len=args.max_seq_len,
                             parallel=max(streams) + 1)
        try:
            aggregate(engine, 1, 4, args.prompt_tokens)   # warm up
            tok_s, cpu_tok_s = {s: [] for s in streams}, {s: [] for s in streams}
            idle, busy = [], []
            for rnd in range(args.repeats):
                for s in streams:
                    r = aggregate(engine, s, args.tokens, args.prompt_tokens)
                    tok_s[s].append(r["tok_s"])
                    cpu_tok_s[s].append(r["cpu_tok_s"])
                idle.append(ttft(engine, 0, args.tokens, args.prompt_tokens, seed=1000 + 2 * rnd))
                busy.append(ttft(engine, max(streams), args.tokens, args.prompt_tokens, seed=1001 + 2 * rnd))
            med = {s: statistics.median(v) for s, v in tok_s.items()}
            cpu_med = {s: statistics.median(v) for s, v in cpu_tok_s.items()}
            idle, busy = statistics.median(idle), statistics.median(busy)
            one = med[streams[0]]
            print(json.dumps({"threads": nt, "tok_s": med, "all_tok_s": tok_s,
                              "speedup": {s: round(v / one, 2) for s, v in med.items()},
                              "cpu_tok_s": cpu_med,
                              "cpu_speedup": {s: round(v / cpu_med[streams[0]], 2) for s, v in cpu_med.items()},
                              "ttft_idle_s": round(idle, 3), f"ttft_{max(streams)}_busy_s": round(busy, 3),
                              "ttft_ratio": round(busy / idle, 2)}), flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
