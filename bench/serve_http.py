"""Batched serving over HTTP, dllama-api against llama.cpp's llama-server: aggregate tokens/s of 1 and of N
concurrent streams, both servers at the same --parallel and threads, on the same GGUF, in the same run.

    flock /work/bench.lock python bench/serve_http.py --model /work/models/b1.gguf \\
          --llama-server /work/llama-native/bin/llama-server [--threads 1,2] [--parallel 4] [--streams 1,4]
          [--tokens 48] [--prompt-tokens 16] [--repeats 3]

(bench/build_llama_cpp.sh builds llama-server.) Both servers listen on 127.0.0.1 and are driven by the same
client code: POST /v1/completions with the prompt as token ids (the same ids to both, new ones every round,
so no slot's cache holds them), greedy, `max_tokens` each, end of text suppressed (llama-server's
`ignore_eos`, and for both a `logit_bias` of -100 on every control token) so both generate exactly that
many; every reply's usage.completion_tokens is checked. Aggregate tok/s = all streams' generated tokens /
wall time from the first request sent to the last reply (prompt evaluation included, for both alike). Both
servers run at once and take turns, stream count by stream count, so load on a shared host falls on both;
medians are printed, one JSON line per thread count, with the load average beside them.

Time to first token (issue 15's goal: busy <= 2x idle): the wall time of a short request for one token
(`--prompt-tokens` new ids), on the idle server and while `--ttft-busy` long streamed requests are
generating (each has sent its first token; they are cancelled after), alternating, `--repeats` times each.
The servers get one slot more than --parallel when the busy ones would otherwise fill every slot, so that
the short request is served beside them, not queued behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from api_cache import start_server, stop_server   # bench/ is the script's directory, on sys.path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(binary: str, model: str, threads: int, parallel: int, seq_len: int):
    log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-bench-", suffix=".log")
    port = _free_port()
    # -c is the context of all slots together: each gets seq_len, as dllama's --max-seq-len per slot
    proc = subprocess.Popen([binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-tb", str(threads), "--parallel", str(parallel), "-c", str(seq_len * parallel),
                             "--no-webui"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"llama-server exited:\n{open(log.name).read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, log, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("llama-server did not become ready")


def _complete(client: httpx.Client, base: str, prompt: list[int], tokens: int, stops: list[int]) -> int:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
            "logit_bias": {str(t): -100.0 for t in stops}}
    r = client.post(f"{base}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    n = r.json()["usage"]["completion_tokens"]
    if n != tokens:
        sys.exit(f"{base} generated {n} tokens, asked for {tokens}")
    return n


def aggregate(client: httpx.Client, base: str, prompts: list[list[int]], tokens: int, stops: list[int]) -> float:
    """Tokens/s of len(prompts) requests sent at once."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        n = sum(pool.map(lambda p: _complete(client, base, p, tokens, stops), prompts))
        return n / (time.perf_counter() - t0)


def _long_stream(base: str, prompt: list[int], tokens: int, stops: list[int], started: threading.Event,
                 done: threading.Event) -> None:
    """A streamed request generating until `done` (closing it cancels it on the server); `started` is set at
    its first token."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "logit_bias": {str(t): -100.0 for t in stops}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                started.set()
            if done.is_set():
                return


def ttft(client: httpx.Client, base: str, prompt: list[int], busy: list[list[int]], tokens: int,
         stops: list[int]) -> float:
    """Seconds a one-token request for `prompt` takes while len(busy) long streams generate."""
    done = threading.Event()
    events = [threading.Event() for _ in busy]
    threads = [threading.Thread(target=_long_stream, args=(base, p, tokens, stops, e, done), daemon=True)
               for p, e in zip(busy, events)]
    for t in threads:
        t.start()
    try:
        for e in events:
            if not e.wait(300):
                sys.exit(f"{base}: a long request sent no token within 300 s")
        time.sleep(0.2)   # the long ones are decoding, several tokens past their prompts
        t0 = time.perf_counter()
        _complete(client, base, prompt, 1, stops)
        return time.perf_counter() - t0
    finally:
        done.set()
        for t in threads:
            t.join(60)


def _control_tokens(model: str) -> list[int]:
    """Ids of the GGUF vocabulary's control tokens (EOS, end of turn, ...): any may end a reply."""
    from gguf import GGUFReader

    field = GGUFReader(model).fields["tokenizer.ggml.token_type"]
    types = np.array([field.parts[i][0] for i in field.data])
    return np.flatnonzero(types == 3).tolist()   # gguf's TokenType.CONTROL


def _ttfts(client: httpx.Client, servers: dict, args, rng, stops: list[int]) -> dict:
    """{server: {"idle": [s], "busy": [s]}}: idle and busy alternating, new prompts every time."""
    times = {name: {"idle": [], "busy": []} for name in servers}
    if not args.ttft_busy:
        return times
    long_tokens = args.max_seq_len - args.prompt_tokens - 1
    for rnd in range(args.repeats + 1):   # round 0 warms up
        for name, (_, _, base) in servers.items():
            for kind in ("idle", "busy"):
                prompts = rng.integers(300, 30000, (args.ttft_busy + 1, args.prompt_tokens)).tolist()
                busy = prompts[1:] if kind == "busy" else []
                t = ttft(client, base, prompts[0], busy, long_tokens, stops)
                if rnd:
                    times[name][kind].append(round(t, 4))
    return times


def _ttft_summary(times: dict, busy: int) -> dict:
    if not busy:
        return {}
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    return {"ttft_s": med, "all_ttft_s": times,
            f"ttft_{busy}_busy_over_idle": {name: round(m["busy"] / m["idle"], 2) for name, m in med.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF both servers read")
    ap.add_argument("--llama-server", required=True, help="llama.cpp's llama-server binary")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft-busy", type=int, default=4, help="long requests generating during the busy TTFT "
                    "(0: no TTFT figures)")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    if max(streams) > args.parallel or args.prompt_tokens + args.tokens > args.max_seq_len:
        sys.exit("serve_http: error: streams must fit --parallel and prompt + tokens --max-seq-len")
    stops = _control_tokens(args.model)
    rng = np.random.default_rng(0)
    parallel = max(args.parallel, args.ttft_busy + 1 if args.ttft_busy else 0)
    for nt in (int(t) for t in args.threads.split(",")):
        servers = {}
        try:
            servers["dllama"] = start_server(args.model, nt, args.max_seq_len, ("--parallel", str(parallel)))
            servers["llama.cpp"] = start_llama_server(args.llama_server, args.model, nt, parallel, args.max_seq_len)
            tok_s = {name: {s: [] for s in streams} for name in servers}
            with httpx.Client(limits=httpx.Limits(max_connections=2 * args.parallel)) as client:
                for rnd in range(args.repeats + 1):   # round 0 warms up (compiles, first allocations)
                    for s in streams:
                        # the same prompts to both servers; ids clear of the special tokens at the start
                        prompts = rng.integers(300, 30000, (s, args.prompt_tokens)).tolist()
                        for name, (_, _, base) in servers.items():
                            v = aggregate(client, base, prompts, args.tokens, stops)
                            if rnd:
                                tok_s[name][s].append(round(v, 2))
                times = _ttfts(client, servers, args, rng, stops)
            med = {name: {s: statistics.median(v) for s, v in per.items()} for name, per in tok_s.items()}
            print(json.dumps({
                "threads": nt, "parallel": args.parallel, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                "tok_s": med, "all_tok_s": tok_s,
                "speedup": {name: {s: round(v / m[streams[0]], 2) for s, v in m.items()} for name, m in med.items()},
                "dllama_over_llama_cpp": {s: round(med["dllama"][s] / med["llama.cpp"][s], 2) for s in streams},
                "slots": parallel, **_ttft_summary(times, args.ttft_busy),
                "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
        finally:
            for name, (proc, log, _) in servers.items():
                if name == "dllama":
                    stop_server(proc, log)
                else:
                    proc.terminate()
                    proc.wait(15)
                    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
