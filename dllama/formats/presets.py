"""The shapes `dllama random-model` starts from: real models' dimensions, without their weights.

Kept apart from the writer so that `dllama random-model --help` lists them without importing numpy.
"""

from __future__ import annotations

import dataclasses

from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec

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
OVERRIDES = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


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
