"""`dllama random-model`: write a random-weight `.m` model of a preset's shape, with fields overridden."""

from __future__ import annotations

import sys
import time

from dllama.formats.presets import OVERRIDES, PRESETS, preset_spec


def add_arguments(parser) -> None:
    parser.add_argument("--output", required=True, help="the .m file to write")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the shape to start from")
    for f in OVERRIDES:
        parser.add_argument(f"--{f.replace('_', '-')}", type=int, default=None, help=f"override the preset's {f}")
    parser.add_argument("--weight-type", default="q40", choices=("q40", "q80", "f16", "f32"),
                        help="matmul weight type (embedding and norms are always f32)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    spec = preset_spec(args.preset, args.weight_type, **{f: getattr(args, f) for f in OVERRIDES})
    from dllama.formats.convert import sigterm_as_exit
    from dllama.formats.random_model import write_random_model

    t0 = time.perf_counter()
    with sigterm_as_exit():
        size = write_random_model(args.output, spec, args.seed, progress=True)
    dt = time.perf_counter() - t0
    print(f"wrote {args.output}: {spec.n_layers} layers, dim {spec.dim}, ffn {spec.hidden_dim}, "
          f"{spec.n_heads}/{spec.n_kv_heads} heads, vocab {spec.vocab_size}, {spec.weight_type}; "
          f"{size / 1e6:.1f} MB in {dt:.1f} s", file=sys.stdout)
    return 0
