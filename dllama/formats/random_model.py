"""`dllama random-model`: a `.m` file of any shape with random weights N(0, 0.02) and unit norms.

Only the speed of such a model means anything (benchmarks, partition and network tests). Weights are
generated and quantized a chunk of rows at a time straight into the output, so an 8B file is written
in bounded RAM.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec

STD = 0.02
_LLAMA3 = dict(rope_theta=500000.0, norm_eps=1e-5, vocab_size=128256, hidden_act="silu")
PRESETS = {
    # Llama 3.2 1B: long context through Llama 3.1 rope scaling
    "llama3_2_1b": ModelSpec(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                             seq_len=131072, rope_type="llama3.1", rope_scaling_factor=32.0,
                             rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
                             rope_scaling_orig_max_seq_len=8192, **_LLAMA3),
    "llama3_8b": ModelSpec(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                           seq_len=8192, **_LLAMA3),
    "llama3_70b": ModelSpec(dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                            seq_len=8192, **_LLAMA3),
    "smollm2_135m": ModelSpec(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                              vocab_size=49152, seq_len=8192, rope_theta=100000.0, norm_eps=1e-5),
}
_OVERRIDES = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def preset_spec(preset: str, weight_type: str = "q40", **overrides) -> ModelSpec:
    """A copy of a preset with fields replaced (None values ignored); head_dim follows dim / n_heads."""
    if preset not in PRESETS:
        raise DllamaError(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
    changes = {k: v for k, v in overrides.items() if v is not None}
    for k, v in changes.items():
        if v <= 0:
            raise DllamaError(f"--{k.replace('_', '-')} must be positive, got {v}")
    spec = dataclasses.replace(PRESETS[preset], weight_type=weight_type, name=f"random {preset}", **changes)
    if "dim" in changes or "n_heads" in changes:
        spec.head_dim = spec.dim // spec.n_heads
    if spec.n_heads % spec.n_kv_heads or spec.dim % spec.n_heads:
        raise DllamaError(f"bad shape: dim {spec.dim}, {spec.n_heads} heads, {spec.n_kv_heads} KV heads "
                          "(dim must divide by heads, heads by KV heads)")
    for f in ("dim", "hidden_dim"):
        if getattr(spec, f) % 32:
            raise DllamaError(f"--{f.replace('_', '-')} {getattr(spec, f)} must be a multiple of 32 (block size)")
    return spec


def _random_rows(rng: np.random.Generator, rows: int, cols: int):
    step = max(1, (1 << 22) // cols)
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= np.float32(STD)
        yield x


def random_tensors(spec: ModelSpec, seed: int = 0):
    """(name, source) pairs for write_dlm: norms are ones, everything else N(0, 0.02) row chunks."""
    from dllama.formats.dlm import dlm_layout, write_key_set

    rng = np.random.default_rng(seed)
    for name, _qtype, shape in dlm_layout(spec, write_key_set(spec)):
        if len(shape) == 1:
            yield name, np.ones(shape, dtype=np.float32)
        else:
            yield name, _random_rows(rng, shape[0], shape[1])


def _prefetched(items, depth: int = 3):
    """The (name, source) pairs of `items`, their chunks computed by a thread `depth` chunks ahead.

    Drawing normal numbers costs twice what quantizing them does, and numpy releases the GIL for
    both, so on two cores the writer quantizes one chunk while the thread draws the next. The values
    are those of `items`, in the same order.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for name, src in items:
                for chunk in ([src] if isinstance(src, np.ndarray) else src):
                    if not put((name, chunk)):
                        return
            put(end)
        except BaseException as exc:   # handed to the writer, which raises it
            put(exc)

    def take():
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    threading.Thread(target=produce, name="random-model", daemon=True).start()
    try:
        item = take()
        while item is not end:
            name = item[0]

            def chunks():
                nonlocal item
                while item is not end and item[0] == name:
                    yield item[1]
                    item = take()

            it = chunks()
            yield name, it
            for _ in it:   # whatever the consumer left of this tensor
                pass
    finally:
        stop.set()


def write_random_model(path: str, spec: ModelSpec, seed: int = 0, progress: bool = False) -> int:
    """Writes a random `.m` of spec's shape atomically; returns its size. Raises DllamaError.

    The weights are those of `random_tensors(spec, seed)`.
    """
    from dllama.formats.convert import with_progress
    from dllama.formats.dlm import write_dlm

    items = _prefetched(random_tensors(spec, seed))
    return write_dlm(path, spec, with_progress(items, spec.n_layers, "random-model") if progress else items)


def add_arguments(parser) -> None:
    parser.add_argument("--output", required=True, help="the .m file to write")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the shape to start from")
    for f in _OVERRIDES:
        parser.add_argument(f"--{f.replace('_', '-')}", type=int, default=None, help=f"override the preset's {f}")
    parser.add_argument("--weight-type", default="q40", choices=("q40", "q80", "f16", "f32"),
                        help="matmul weight type (embedding and norms are always f32)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    spec = preset_spec(args.preset, args.weight_type, **{f: getattr(args, f) for f in _OVERRIDES})
    from dllama.formats.convert import sigterm_as_exit

    t0 = time.perf_counter()
    with sigterm_as_exit():
        size = write_random_model(args.output, spec, args.seed, progress=True)
    dt = time.perf_counter() - t0
    print(f"wrote {args.output}: {spec.n_layers} layers, dim {spec.dim}, ffn {spec.hidden_dim}, "
          f"{spec.n_heads}/{spec.n_kv_heads} heads, vocab {spec.vocab_size}, {spec.weight_type}; "
          f"{size / 1e6:.1f} MB in {dt:.1f} s")
    return 0
