"""`dllama convert`: a GGUF model, or a Hugging Face checkpoint folder, to the reference's `.m` (+ `.t`
tokenizer) files; a checkpoint also to GGUF."""

from __future__ import annotations

import os
import sys
import time

from dllama.commands.common import add_m_keys_argument


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="the GGUF (or .m) model to convert")
    source.add_argument("--hf", metavar="DIR",
                        help="a Hugging Face checkpoint folder (config.json, *.safetensors in bf16/f16/f32, "
                             "tokenizer.json): Llama, Mistral, Mixtral, Qwen3, Qwen3-MoE")
    parser.add_argument("--output-model", required=True,
                        help="the .m file to write (with --hf: a name ending in .gguf writes GGUF instead)")
    parser.add_argument("--output-tokenizer", default=None, help="the .t file to write (optional)")
    parser.add_argument("--weight-type", default="q40", choices=("q40", "q80", "f16", "f32"),
                        help="type of the matmul weights (embedding and norms are always f32)")
    parser.add_argument("--pad-kv-heads", type=int, default=None, metavar="N",
                        help="add all-zero KV heads (and their query heads) up to N, so that a model whose head "
                             "count splits over no node count (SmolLM2: 3) runs on 2 or 4 nodes; the outputs "
                             "do not change (with --model)")
    add_m_keys_argument(parser)


def run(args) -> int:
    from dllama.errors import DllamaError
    from dllama.formats.convert import convert, sigterm_as_exit

    t0 = time.perf_counter()
    with sigterm_as_exit():
        if args.hf:
            from dllama.formats.hf_convert import convert_hf

            if args.pad_kv_heads:
                raise DllamaError("--pad-kv-heads works with --model only")
            spec = convert_hf(args.hf, args.output_model, args.output_tokenizer, args.weight_type)
        else:
            from dllama.catalog import resolve_model

            spec = convert(resolve_model(args.model), args.output_model, args.output_tokenizer, args.weight_type,
                           args.pad_kv_heads, m_keys=args.m_keys)
    size = os.path.getsize(args.output_model)
    print(f"wrote {args.output_model} ({spec.arch}, {spec.n_layers} layers, dim {spec.dim}, {spec.weight_type}, "
          f"{size / 1e6:.1f} MB)" + (f" and {args.output_tokenizer}" if args.output_tokenizer else "")
          + f" in {time.perf_counter() - t0:.1f} s", file=sys.stdout)
    return 0
