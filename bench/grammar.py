"""What constrained decoding (`response_format`, dllama/grammar.py) costs per token, with a real vocabulary
and no model: llguidance's mask for the next token plus applying it to the logits, over the steps of a
JSON reply, against one unconstrained sampling step.

    python bench/grammar.py [--model GGUF] [--steps 200]

Also prints the once-per-process cost (llguidance's view of the vocabulary) and a matcher's per request.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dllama import grammar
from dllama.catalog import resolve_model
from dllama.sampler import Sampler
from dllama.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "score"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 8},
                         "score": {"type": "number"}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m_instruct")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    tk = Tokenizer.from_gguf(resolve_model(args.model))
    n = tk.vocab_size
    t0 = time.perf_counter()
    grammar.matcher_for(tk, n, {})
    print(f"vocabulary of {n} tokens for llguidance, first mask: {1000 * (time.perf_counter() - t0):.0f} ms (once)")
    rng = np.random.default_rng(0)
    plain, masked, builds = Sampler(0.7, 1.0, seed=1), [], []
    base = []
    logits = np.empty(n, np.float32)
    while len(masked) < args.steps:
        t0 = time.perf_counter()
        s = grammar.GrammarSampler(Sampler(0.7, 1.0, seed=len(masked)), grammar.matcher_for(tk, n, SCHEMA), n)
        builds.append(time.perf_counter() - t0)
        while len(masked) < args.steps:
            logits[:] = rng.standard_normal(n)
            t0 = time.perf_counter()
            plain(logits)
            base.append(time.perf_counter() - t0)
            logits[:] = rng.standard_normal(n)
            t0 = time.perf_counter()
            tok = s(logits)
            masked.append(time.perf_counter() - t0)
            if tok in tk.eos_ids:
                break
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(f"matcher per request: {ms(builds):.2f} ms (median of {len(builds)})")
    print(f"sampling step, full logits: {ms(base):.3f} ms; constrained: {ms(masked):.3f} ms "
          f"(median of {len(masked)} steps; the mask adds {ms(masked) - ms(base):.3f} ms)")


if __name__ == "__main__":
    main()
