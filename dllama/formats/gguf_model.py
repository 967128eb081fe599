"""GGUF model files (the architectures of `schema.GGUF_ARCHS`), read by `gguf_reader.GGUFFile`.

GGUF lists a tensor's dimensions fastest-first (ne0 = columns), so a matrix of ne = [cols, rows] is
(rows, cols) here. Llama GGUF files already hold Q/K rows in the adjacent-pairs RoPE order the
reference's `.m` files use, so nothing is permuted. The reader memory-maps the file read-only; every
Tensor's data is a view of that map.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter

import numpy as np

from dllama import quants, schema
from dllama.errors import FormatError
from dllama.formats.loader import LoadedModel, Tensor
from dllama.formats.spec import ModelSpec

SUPPORTED_TYPES = {quants.QUANTS[q].gguf.name: q for q in quants.QTYPES}
GLOBAL_NAMES = {r.gguf_name(): r.leaf for r in schema.ROWS if r.scope == schema.GLOBAL}
GLOBAL_NAMES["rope_freqs.weight"] = "rope_freqs"
# a layer's tensors by the GGUF name's middle part (blk.N.<kind>.weight); experts stacked or one by one
LAYER_NAMES = {r.gguf_name(0).split(".")[2]: r.leaf for r in schema.ROWS if r.scope == schema.LAYER}
EXPERT_NAMES = {r.gguf_name(0).split(".")[2]: r.leaf for r in schema.ROWS if r.scope == schema.EXPERT}
# tensors some llama GGUFs carry that inference never reads
IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd\.weight")
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.weight")


def _open(path: str):
    # our reader, not gguf.GGUFReader: same interface, 25x faster on a 50k-token vocabulary
    from dllama.formats.gguf_reader import GGUFFile

    return GGUFFile(path)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _internal_names(t, path: str, arch: str) -> list[tuple[str, int | None]]:
    """[(internal name, expert index or None)] for one GGUF tensor; several for a stacked-experts tensor."""
    if t.name in GLOBAL_NAMES:
        return [(GLOBAL_NAMES[t.name], None)]
    m = _LAYER_RE.fullmatch(t.name)
    if m:
        layer, kind, expert = m.group(1), m.group(2), m.group(3)
        if expert is not None and LAYER_NAMES.get(kind) in EXPERT_NAMES.values():
            return [(f"layers.{layer}.experts.{expert}.{LAYER_NAMES[kind]}", None)]
        if expert is None and kind in LAYER_NAMES:
            return [(f"layers.{layer}.{LAYER_NAMES[kind]}", None)]
        if expert is None and kind in EXPERT_NAMES:
            n = int(t.shape[2]) if len(t.shape) == 3 else 0
            return [(f"layers.{layer}.experts.{e}.{EXPERT_NAMES[kind]}", e) for e in range(n)]
    if IGNORED.fullmatch(t.name):
        return []
    raise FormatError(f"{path}: unexpected tensor {t.name} for architecture {arch}")


def _tensors(reader, path: str, arch: str) -> dict:
    out = {}
    for t in reader.tensors:
        qtype = SUPPORTED_TYPES.get(t.tensor_type.name)
        if qtype is None:
            raise FormatError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which dllama cannot read "
                              f"({', '.join(SUPPORTED_TYPES)})")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = t.data.view(np.uint8).reshape(-1)
        for name, expert in _internal_names(t, path, arch):
            if expert is None:
                out[name] = Tensor(name, qtype, shape, raw)
            else:
                per = raw.size // shape[0]
                out[name] = Tensor(name, qtype, shape[1:], raw[expert * per:(expert + 1) * per])
    return out


def _clean_float(x) -> float:
    # GGUF stores f32: 1e-5 comes back as 9.999999747e-06; keep the value its author wrote
    return float(f"{float(x):.7g}")


def _llama3_rope(factors: np.ndarray, head_dim: int, theta: float, orig_ctx: int, path: str):
    """(factor, low_freq_factor, high_freq_factor) that reproduce a `rope_freqs` tensor.

    llama.cpp's converter stores Llama 3.1 scaling as one divisor per frequency instead of its
    parameters: 1 for short wavelengths, `factor` for long ones, a smooth blend between the
    wavelengths orig_ctx / high and orig_ctx / low. Only those two wavelengths are recoverable, so
    orig_ctx comes from the metadata (8192, the Llama 3 default, when absent).
    """
    factors = factors.astype(np.float64)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    factor = float(factors.max())
    low, high = 1.0, 4.0
    mid = (factors > 1 + 1e-6) & (factors < factor - 1e-6) if factor > 1 else np.zeros_like(factors, bool)
    if mid.sum() >= 2:
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(orig_ctx / wavelen[mid], smooth, 1)
        low = round(-b / a, 3)
        high = round(low + 1 / a, 3)
    expect = np.where(wavelen < orig_ctx / high, 1.0,
                      np.where(wavelen > orig_ctx / low, factor, 0.0))
    s = (orig_ctx / wavelen - low) / (high - low)
    expect = np.where(expect == 0, 1 / ((1 - s) / factor + s), expect)
    if not np.allclose(expect, factors, rtol=1e-3):
        raise FormatError(f"{path}: rope_freqs.weight is not Llama 3.1 rope scaling; dllama cannot run it")
    return _clean_float(factor), low, high


def _spec(reader, tensors: dict, path: str, gguf_arch: str) -> ModelSpec:
    def key(k, default=None):
        return _field(reader, f"{gguf_arch}.{k}", default)

    for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length"):
        if key(k) is None:
            raise FormatError(f"{path}: GGUF metadata lacks {gguf_arch}.{k}")
    if "tok_embd" not in tensors:
        raise FormatError(f"{path}: GGUF has no token_embd.weight tensor")
    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):   # a per-layer list (some converters); dllama needs one value
        if len(set(n_kv)) != 1:
            raise FormatError(f"{path}: KV heads differ between layers ({sorted(set(n_kv))}); not supported")
        n_kv = n_kv[0]
    n_experts = int(key("expert_count", 0) or 0)
    arch = schema.GGUF_ARCHS[gguf_arch][bool(n_experts)]
    if arch is None:
        raise FormatError(f"{path}: GGUF architecture {gguf_arch!r} {'with' if n_experts else 'without'} "
                          "experts is not supported")
    layer_types = Counter(t.qtype for n, t in tensors.items() if n.startswith("layers.") and len(t.shape) == 2
                          and not n.endswith("moe_gate"))
    spec = ModelSpec(
        arch=arch, dim=dim, hidden_dim=int(key("feed_forward_length")),
        n_layers=int(key("block_count")), n_heads=n_heads, n_kv_heads=int(n_kv),
        head_dim=int(key("attention.key_length", dim // n_heads)), vocab_size=tensors["tok_embd"].shape[0],
        seq_len=int(key("context_length", 0)), n_experts=n_experts,
        n_active_experts=int(key("expert_used_count", 0) or 0),
        moe_hidden_dim=int(key("expert_feed_forward_length", 0) or 0), hidden_act="gelu" if arch in schema.GELU else "silu",
        rope_type="falcon" if arch in schema.NEOX_ROPE else "llama",
        rope_theta=_clean_float(key("rope.freq_base", 10000.0)),
        norm_eps=_clean_float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        weight_type=layer_types.most_common(1)[0][0] if layer_types else "f32",
        tied_embeddings="wcls" not in tensors, name=_field(reader, "general.name", "") or os.path.basename(path),
        extra={"gguf_file_type": _field(reader, "general.file_type")},
    )
    _rope_scaling(reader, tensors, spec, path, gguf_arch)
    if arch in schema.GROK:
        for f, (k, default) in schema.GROK_SCALINGS.items():
            v = key(k)
            setattr(spec, f, default if v is None else _clean_float(v))
    return spec


def _rope_scaling(reader, tensors: dict, spec: ModelSpec, path: str, gguf_arch: str) -> None:
    def key(k, default):
        return _field(reader, f"{gguf_arch}.rope.scaling.{k}", default)

    kind = key("type", "none")
    orig = int(key("original_context_length", 0) or 0)
    if kind == "llama3":
        spec.rope_type = "llama3.1"
        spec.rope_scaling_factor = _clean_float(key("factor", 8.0))
        spec.rope_scaling_low_freq_factor = _clean_float(key("low_freq_factor", 1.0))
        spec.rope_scaling_high_freq_factor = _clean_float(key("high_freq_factor", 4.0))
        spec.rope_scaling_orig_max_seq_len = orig or 8192
    elif kind not in ("none", None):
        raise FormatError(f"{path}: rope scaling type {kind!r} is not supported (none or llama3)")
    freqs = tensors.pop("rope_freqs", None)
    if freqs is not None:
        factors = freqs.to_f32()
        if len(factors) != spec.head_dim // 2:
            raise FormatError(f"{path}: rope_freqs.weight has {len(factors)} values, expected {spec.head_dim // 2}")
        orig = orig or 8192
        try:
            f, lo, hi = _llama3_rope(factors, spec.head_dim, spec.rope_theta, orig, path)
        except FormatError:
            # not recoverable as Llama 3.1 parameters (e.g. fewer than two blended frequencies): the
            # engine divides by the factors themselves, as llama.cpp does; only `.m` export needs them
            f = 0.0
        if f > 1:
            spec.rope_type = "llama3.1"
            spec.rope_scaling_factor, spec.rope_scaling_low_freq_factor = f, lo
            spec.rope_scaling_high_freq_factor, spec.rope_scaling_orig_max_seq_len = hi, orig
        spec.extra["rope_freqs"] = np.array(factors)


def _check_complete(spec: ModelSpec, tensors: dict, path: str) -> None:
    """Every tensor the schema gives `spec` is there with the shape the metadata implies, and no other."""
    need = {name: r.shape(spec) for name, r, _ in schema.entries(spec)}
    if spec.tied_embeddings:
        del need["wcls"]
    missing = [n for n in need if n not in tensors]
    if missing:
        raise FormatError(f"{path}: GGUF lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    extra = [n for n in tensors if n not in need]
    if extra:
        raise FormatError(f"{path}: unexpected tensor {extra[0]} for architecture {spec.arch}")
    for name, shape in need.items():
        if tensors[name].shape != shape:
            raise FormatError(f"{path}: tensor {name} has shape {tensors[name].shape}, metadata implies {shape}")


def read_gguf(path: str) -> LoadedModel:
    """Maps a GGUF file read-only. Raises FormatError (other architecture, unsupported tensor type, missing
    tensor or metadata, damaged file), naming the file and the problem."""
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in schema.GGUF_ARCHS:
        raise FormatError(f"{path}: unsupported GGUF architecture {arch!r} "
                          f"(dllama reads {', '.join(schema.GGUF_ARCHS)})")
    tensors = _tensors(reader, path, arch)
    spec = _spec(reader, tensors, path, arch)
    _check_complete(spec, tensors, path)
    if spec.tied_embeddings:
        tensors["wcls"] = tensors["tok_embd"]
    return LoadedModel(spec=spec, tensors=tensors, path=path, kind="gguf", _owner=reader)
