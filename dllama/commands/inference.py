"""`dllama inference`: generate from a prompt and report the speed (the reference's benchmark command)."""

from __future__ import annotations

import json
import sys

from dllama.commands.common import add_model_arguments, check_at_least, make_sampler, open_engine, write_out
from dllama.errors import DllamaError

DEFAULT_STEPS = 64


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--steps", type=int, default=None,
                   help=f"tokens to generate (default {DEFAULT_STEPS}, or what the context leaves if less; "
                        "the reference counts the prompt in too)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (ids, text, timings) on one line instead of streaming")
    p.add_argument("--verbose", action="store_true", help="print a timing line per generated token to stderr")


def run(args) -> int:
    # each flag on its own first, so that a message never blames a flag the user did not pass
    check_at_least("--steps", args.steps, 1)
    check_at_least("--max-seq-len", args.max_seq_len, 1)
    check_at_least("--nthreads", args.nthreads, 1)
    if None not in (args.steps, args.max_seq_len) and args.steps > args.max_seq_len:
        raise DllamaError(f"--steps {args.steps} is past --max-seq-len {args.max_seq_len}")
    sampler = make_sampler(args)
    engine = open_engine(args)
    try:
        return _generate(engine, args, sampler)
    finally:
        engine.close()


def _generate(engine, args, sampler) -> int:
    from dllama.tokenizer import StreamDecoder

    tok = engine.tokenizer
    prompt_ids = tok.encode(args.prompt)
    steps = args.steps
    if steps is None:
        steps = min(DEFAULT_STEPS, engine.seq_len - len(prompt_ids))   # generate() refuses a prompt that fills it
    elif len(prompt_ids) + steps > engine.seq_len:
        raise DllamaError(f"the prompt ({len(prompt_ids)} tokens) plus --steps {steps} do not fit the "
                          f"context of {engine.seq_len} tokens (see --max-seq-len)")
    decoder = StreamDecoder(tok)
    ids = []
    if not args.json:
        write_out(args.prompt)
    # A benchmark: exactly --steps tokens, end-of-text tokens included, as the reference does.
    stops = ()
    for t in engine.generate(prompt_ids, steps, sampler, stop_ids=stops):
        ids.append(t)
        piece = decoder.feed(t)
        if not args.json:
            write_out(piece)
            if args.verbose:
                st = engine.stats
                ms = st.token_ms[-1] if st.token_ms else 0.0
                print(f"🔶 {ms:7.2f} ms", file=sys.stderr)
    st = engine.stats.summary()
    if args.json:
        obj = {"prompt_ids": prompt_ids, "generated_ids": ids, "text": tok.decode(ids), **st}
        print(json.dumps(obj))
    else:
        write_out(decoder.flush() + "\n")
        _print_summary(st, sys.stderr)
    return 0


def _print_summary(st: dict, f) -> None:
    print("Evaluation", file=f)
    print(f"    nTokens: {st['prompt_tokens']}", file=f)
    if st["prompt_tokens_per_s"]:
        print(f"   tokens/s: {st['prompt_tokens_per_s']:.2f} ({1000 / st['prompt_tokens_per_s']:.2f} ms/tok)", file=f)
    print("Prediction", file=f)
    print(f"    nTokens: {st['generated_tokens']}", file=f)
    print(f"   tokens/s: {st['generation_tokens_per_s']:.2f} ({st['avg_token_ms']:.2f} ms/tok)", file=f)
    print(f"   avg I: {st['avg_inference_ms']:.2f} ms  T: {st['avg_transfer_ms']:.2f} ms  "
          f"sent {st['sent_bytes_per_token'] / 1024:.1f} kB  recv {st['recv_bytes_per_token'] / 1024:.1f} kB"
          " per token", file=f)
