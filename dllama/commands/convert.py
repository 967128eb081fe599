"""`dllama convert`: a GGUF model to the reference's `.m` (+ `.t` tokenizer) files."""

from __future__ import annotations

import os
import sys
import time


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="the GGUF model to convert (architecture llama)")
    parser.add_argument("--output-model", required=True, help="the .m file to write")
    parser.add_argument("--output-tokenizer", default=None, help="the .t file to write (optional)")
    parser.add_argument("--weight-type", default="q40", choices=("q40", "q80", "f16", "f32"),
                        help="type of the matmul weights (embedding and norms are always f32)")
    parser.add_argument("--pad-kv-heads", type=int, default=None, metavar="N",
                        help="add all-zero KV heads (and their query heads) up to N, so that a model whose head "
                             "count splits over no node count (SmolLM2: 3) runs on 2 or 4 nodes; the outputs "
                             "do not change")


def run(args) -> int:
    from dllama.catalog import resolve_model
    from dllama.formats.convert import convert, sigterm_as_exit

    t0 = time.perf_counter()
    with sigterm_as_exit():
        spec = convert(resolve_model(args.model), args.output_model, args.output_tokenizer, args.weight_type,
                       args.pad_kv_heads)
    size = os.path.getsize(args.output_model)
    print(f"wrote {args.output_model} ({spec.arch}, {spec.n_layers} layers, dim {spec.dim}, {spec.weight_type}, "
          f"{size / 1e6:.1f} MB)" + (f" and {args.output_tokenizer}" if args.output_tokenizer else "")
          + f" in {time.perf_counter() - t0:.1f} s", file=sys.stdout)
    return 0
