"""A GGUF model to the reference's `.m` (+ `.t` tokenizer) files.

Matmul weights become --weight-type (q40 by default): a source tensor already of that type is copied
byte for byte, any other is dequantized and re-quantized a chunk of rows at a time. The embedding and
the norms are f32, as the format requires, and `wcls` is written even for a tied model (the `.m`
format always holds it). Both outputs appear only when complete: they are written under temporary
names and renamed at the end; a failure, Ctrl-C or SIGTERM removes the temporaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time

import numpy as np

from dllama.errors import DllamaError


def _write_tokenizer(model, out_path: str) -> None:
    """The tokenizer step, in one place: the GGUF's vocabulary as a `.t` file."""
    from dllama.formats.dlt import write_t
    from dllama.tokenizer import Tokenizer

    if model.kind != "gguf":
        raise DllamaError(f"{model.path}: a .m file holds no vocabulary; cannot write --output-tokenizer")
    write_t(out_path, Tokenizer.from_gguf(model.gguf_reader))


@contextlib.contextmanager
def sigterm_as_exit():
    """Turns SIGTERM into SystemExit while the block runs, so `finally`/cleanup code runs too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def with_progress(items, n_layers: int, label: str, every: float = 5.0):
    """Passes (name, source) pairs through, telling stderr which layer is being written every few seconds."""
    last = time.monotonic()
    for name, source in items:
        if name.endswith(".wq") and time.monotonic() - last >= every:
            last = time.monotonic()
            layer = int(name.split(".")[1])
            print(f"{label}: layer {layer}/{n_layers}", file=sys.stderr, flush=True)
        yield name, source


def _tensor_sources(model, spec):
    from dllama.formats.dlm import dlm_layout, write_key_set

    for name, _qtype, _shape in dlm_layout(spec, write_key_set(spec)):
        tensor = model.tensors.get(name)
        if tensor is None:
            raise DllamaError(f"{model.path}: has no tensor {name}, which a .m file needs")
        yield name, _padded(name, tensor, spec, model.spec)


def padded_spec(spec, n_kv_heads: int):
    """`spec` with KV heads (and their query heads) added up to `n_kv_heads`. Raises DllamaError.

    The added heads have all-zero weights: their queries and values are 0, so their attention output is
    0, and wo's added columns are 0, so the model computes exactly what it did. The point is a head count
    that splits over more nodes (SmolLM2's 3 KV heads split over none; padded to 4, over 2 and 4).
    """
    if n_kv_heads < spec.n_kv_heads:
        raise DllamaError(f"--pad-kv-heads {n_kv_heads} is fewer than the model's {spec.n_kv_heads} KV heads")
    group = spec.n_heads // spec.n_kv_heads
    return dataclasses.replace(spec, n_kv_heads=n_kv_heads, n_heads=n_kv_heads * group, extra=dict(spec.extra))


def _padded(name: str, tensor, spec, old):
    """The tensor of `name` with zero rows (wq, wk, wv) or columns (wo) for the added heads."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in ("wq", "wk", "wv", "wo") or spec.n_kv_heads == old.n_kv_heads:
        return tensor
    w = tensor.to_f32()
    if leaf == "wo":
        return np.concatenate([w, np.zeros((w.shape[0], spec.q_dim - old.q_dim), np.float32)], axis=1)
    extra = (spec.q_dim - old.q_dim) if leaf == "wq" else (spec.kv_dim - old.kv_dim)
    return np.concatenate([w, np.zeros((extra, w.shape[1]), np.float32)])


def _note_requantizing(model, weight_type: str) -> None:
    """Tells stderr when weights of a type `.m` cannot hold (K-quants and the like) are rounded a second time."""
    from dllama import quants

    source = sorted({t.qtype for t in model.tensors.values() if quants.quant(t.qtype).read_only})
    if source and quants.quant(weight_type).is_block:
        print(f"convert: note: the {', '.join(source)} weights are dequantized and re-quantized to {weight_type}, "
              "which costs accuracy (each weight is rounded twice); dllama runs the GGUF itself as it is",
              file=sys.stderr, flush=True)


def convert(model_path: str, output_model: str, output_tokenizer: str | None = None,
            weight_type: str = "q40", pad_kv_heads: int | None = None, m_keys: str = "auto"):
    """Converts model_path (GGUF or `.m`) to output_model (+ output_tokenizer); returns the written spec.

    Raises DllamaError/FormatError (unreadable input, an architecture or value `.m` cannot hold).
    """
    from dllama.formats.dlm import atomic_paths, header_items, write_dlm_to
    from dllama.formats.loader import load_model

    model = load_model(model_path, m_keys)
    try:
        _note_requantizing(model, weight_type)
        spec = dataclasses.replace(model.spec, weight_type=weight_type, tied_embeddings=False,
                                   extra=dict(model.spec.extra))
        if pad_kv_heads:
            spec = padded_spec(spec, pad_kv_heads)
        header_items(spec)   # refuse what the header cannot hold before writing anything
        factors = spec.extra.get("rope_freqs")
        if factors is not None and spec.rope_type != "llama3.1" and not np.allclose(factors, 1.0):
            raise DllamaError(f"{model_path}: its rope_freqs factors are not Llama 3.1 rope scaling, which is "
                              "all a .m header can describe; run the GGUF directly")
        outputs = [output_model] + ([output_tokenizer] if output_tokenizer else [])
        with atomic_paths(outputs) as temps:
            if output_tokenizer:
                _write_tokenizer(model, temps[1])
            with open(temps[0], "wb") as f:
                write_dlm_to(f, spec, with_progress(_tensor_sources(model, spec), spec.n_layers, "convert"))
    finally:
        model.close()
    return spec
