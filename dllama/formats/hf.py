"""A Hugging Face checkpoint folder (`config.json`, `*.safetensors`) as a ModelSpec plus lazy tensors.

Safetensors files are parsed here, not through the `safetensors` package: the format is an 8-byte header
length, a JSON header and raw little-endian data, and numpy has no bfloat16, which that package's numpy
API refuses. Each shard is memory-mapped once; a tensor is read a few rows at a time (bf16 widened to f32
by a shift), and its pages are dropped from this process once written (`done`), so converting a
checkpoint holds one chunk of rows, not the checkpoint.

Tensors come out in the layout of llama.cpp's `convert_hf_to_gguf.py` for the same architecture, which
is also the `.m` layout: for `llama` (Llama, Mistral, Mixtral) Q/K rows permuted from HF's rotate-half
order into adjacent RoPE pairs; for Qwen3 left in HF's order (rotated as halves, neox).
"""

from __future__ import annotations

import glob
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from dllama import schema
from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec

# config.json `architectures` -> ours
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "mixtral",
                 "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}   # bf16 is widened by hand
ROW_CHUNK_VALUES = 1 << 22   # values per chunk of rows handed on (16 MB as f32)

# HF parameter names per internal leaf: {layer} and {expert} filled in; `experts` rows by architecture
_GLOBAL = {"tok_embd": "model.embed_tokens.weight", "norm": "model.norm.weight", "wcls": "lm_head.weight"}
_LAYER = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
          "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
_MOE = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", {"w1": "w1", "w2": "w2", "w3": "w3"}),
        "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"})}
# transformers >= 5 in memory (a state_dict saved as it is): the router under mlp., each layer's experts
# fused into gate_up_proj (n_experts, 2 * ffn, dim), gate rows first, and down_proj (n_experts, dim, ffn)
_FUSED_ROUTER, _FUSED = "mlp.gate", "mlp.experts."


@dataclass(frozen=True)
class _Entry:
    shard: str
    dtype: str
    shape: tuple
    start: int           # byte offset of the data in the shard file
    end: int


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise DllamaError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DllamaError(f"{path}: not valid JSON ({what}): {exc}") from None


def _shard_header(path: str) -> dict:
    """{tensor name: _Entry} of one safetensors file. Raises DllamaError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise DllamaError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise DllamaError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise DllamaError(f"{path}: not a safetensors file (its header is not JSON)") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise DllamaError(f"{path}: tensor {name} is {dtype}; dllama converts BF16, F16 and F32 checkpoints")
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - start != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize or 8 + n + end > size:
            raise DllamaError(f"{path}: tensor {name} does not fit the file (truncated or damaged)")
        out[name] = _Entry(path, dtype, shape, 8 + n + start, 8 + n + end)
    return out


class Checkpoint:
    """The tensors of a checkpoint folder, by HF name, read on demand. Raises DllamaError when opened on a
    folder that is not a safetensors checkpoint or lacks a shard its index names."""

    def __init__(self, folder: str):
        self.folder = folder
        if not os.path.isdir(folder):
            raise DllamaError(f"--hf {folder}: not a folder")
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            raise DllamaError(f"--hf {folder}: not a Hugging Face checkpoint (no config.json)")
        self.config = _read_json(config, "config.json")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = _read_json(index, "the shard index").get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if not os.path.isfile(os.path.join(folder, s)):
                    raise DllamaError(f"--hf {folder}: shard {s} is missing (model.safetensors.index.json names it)")
            shards = [os.path.join(folder, s) for s in shards]
        else:
            shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not shards:
            other = [f for f in os.listdir(folder) if f.endswith((".bin", ".pth", ".pt", ".gguf"))]
            raise DllamaError(f"--hf {folder}: no *.safetensors files" +
                              (f" (found {other[0]}: only safetensors checkpoints are converted)" if other else ""))
        self.entries: dict[str, _Entry] = {}
        for s in shards:
            self.entries.update(_shard_header(s))
        self._maps: dict[str, mmap.mmap] = {}

    def has(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple:
        return self._entry(name).shape

    def _entry(self, name: str) -> _Entry:
        e = self.entries.get(name)
        if e is None:
            raise DllamaError(f"--hf {self.folder}: the checkpoint has no tensor {name}")
        return e

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16), a view of the shard's map."""
        e = self._entry(name)
        mm = self._maps.get(e.shard)
        if mm is None:
            try:
                with open(e.shard, "rb") as f:
                    mm = self._maps[e.shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise DllamaError(f"cannot read {e.shard}: {exc.strerror}") from None
        return np.frombuffer(mm, DTYPES[e.dtype], math.prod(e.shape), e.start).reshape(e.shape)

    def done(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drops bytes start..stop of tensor `name` (all of it by default) from this process's memory; the
        pages stay in the page cache, and a later read maps them back."""
        e = self._entry(name)
        mm = self._maps.get(e.shard)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = e.start + start
        begin -= begin % mmap.PAGESIZE
        end = e.end if stop is None else e.start + stop
        if end > begin:
            mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        """Drops the maps (each is unmapped once no array of it is left)."""
        self._maps = {}


def to_f32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint16:   # bfloat16: the high half of a float32
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def _config_value(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _rope(cfg: dict, folder: str) -> dict:
    """The ModelSpec rope fields from `rope_parameters` (transformers >= 5) or `rope_scaling` + `rope_theta`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind == "llama3":
        return dict(rope_theta=theta, rope_type="llama3.1", rope_scaling_factor=float(params["factor"]),
                    rope_scaling_low_freq_factor=float(params["low_freq_factor"]),
                    rope_scaling_high_freq_factor=float(params["high_freq_factor"]),
                    rope_scaling_orig_max_seq_len=int(params["original_max_position_embeddings"]))
    raise DllamaError(f"--hf {folder}: rope type {kind!r} is not supported (default or llama3)")


def spec_from_config(cfg: dict, folder: str) -> ModelSpec:
    """The ModelSpec of a config.json. Raises DllamaError naming an unsupported architecture or setting."""
    names = cfg.get("architectures") or [cfg.get("model_type", "?")]
    arch = ARCHITECTURES.get(names[0])
    if arch is None:
        raise DllamaError(f"--hf {folder}: architecture {names[0]} is not supported "
                          f"(dllama converts {', '.join(sorted(ARCHITECTURES))})")
    rope = _rope(cfg, folder)
    if arch in schema.NEOX_ROPE and "rope_type" in rope:
        raise DllamaError(f"--hf {folder}: Llama 3.1 rope scaling on {names[0]} is not supported")
    rope.setdefault("rope_type", "falcon" if arch in schema.NEOX_ROPE else "llama")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        n_experts = int(_config_value(cfg, "num_local_experts", "num_experts", default=0)) if arch in _MOE else 0
        spec = ModelSpec(
            arch=arch, dim=dim, hidden_dim=int(cfg["intermediate_size"]), n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(_config_value(cfg, "num_key_value_heads", default=n_heads)),
            head_dim=int(_config_value(cfg, "head_dim", default=dim // n_heads)), vocab_size=int(cfg["vocab_size"]),
            seq_len=int(cfg.get("max_position_embeddings") or 0), n_experts=n_experts,
            n_active_experts=int(cfg.get("num_experts_per_tok") or 0) if n_experts else 0,
            moe_hidden_dim=int(cfg.get("moe_intermediate_size") or 0) if arch == "qwen3_moe" else 0,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            weight_type="f32", tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            name=os.path.basename(os.path.normpath(folder)), **rope)
    except KeyError as exc:
        raise DllamaError(f"--hf {folder}: config.json lacks {exc.args[0]}") from None
    if cfg.get("hidden_act", "silu") != "silu":
        raise DllamaError(f"--hf {folder}: hidden_act {cfg['hidden_act']!r} is not supported for {names[0]} (silu)")
    if arch == "qwen3_moe":
        # llama.cpp's qwen3moe always normalises the top-k weights, and so does dllama
        if cfg.get("norm_topk_prob") is False or cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise DllamaError(f"--hf {folder}: Qwen3-MoE with unnormalised top-k weights or dense layers "
                              "(norm_topk_prob false, mlp_only_layers, decoder_sparse_step) is not supported")
    if arch in _MOE and not n_experts:
        raise DllamaError(f"--hf {folder}: {names[0]} without an expert count in config.json")
    return spec


def _permute_rows(x: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute: rows i and i + h/2 of each head become rows 2i and 2i + 1
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)


class Source:
    """One output tensor: its (rows, cols) or (n,) shape and f32 row chunks read from the checkpoint."""

    def __init__(self, ckpt: Checkpoint, hf_name: str, shape: tuple, rows: slice | None = None,
                 index: int | None = None, heads: int = 0):
        self.ckpt, self.hf_name, self.shape = ckpt, hf_name, shape
        self.rows, self.index, self.heads = rows, index, heads   # fused experts: [index][rows]; heads: permute

    def chunks(self):
        x = self.ckpt.raw(self.hf_name)
        if self.index is not None:
            x = x[self.index]
        if self.rows is not None:
            x = x[self.rows]
        if x.shape != self.shape:
            raise DllamaError(f"--hf {self.ckpt.folder}: tensor {self.hf_name} has shape {x.shape}, "
                              f"config.json implies {self.shape}")
        if x.ndim == 1:
            yield to_f32(x)
            return
        # permuted rows are gathered within a head: chunks of whole heads
        unit = x.shape[0] // self.heads if self.heads else 1
        step = max(1, ROW_CHUNK_VALUES // x.shape[1] // unit) * unit
        row_bytes = x.shape[1] * x.itemsize
        for r in range(0, x.shape[0], step):
            chunk = to_f32(x[r:r + step])
            yield _permute_rows(chunk, chunk.shape[0] // unit) if self.heads else chunk
            if self.index is None:   # the rows just written: a tensor's pages never pile up
                self.ckpt.done(self.hf_name, r * row_bytes, (r + len(chunk)) * row_bytes)


def sources(ckpt: Checkpoint, spec: ModelSpec) -> dict:
    """{internal name: Source} of every tensor the schema gives `spec` (`wcls` from the embedding when tied)."""
    out = {}
    for name, row, (layer, expert) in schema.entries(spec):
        shape = row.shape(spec)
        if layer is None:
            hf = _GLOBAL[row.leaf]
            if row.leaf == "wcls" and spec.tied_embeddings:
                hf = _GLOBAL["tok_embd"]
            out[name] = Source(ckpt, hf, shape)
        elif expert is not None:
            out[name] = _expert_source(ckpt, spec, layer, expert, row.leaf, shape)
        else:
            p = f"model.layers.{layer}."
            hf = p + (_MOE[spec.arch][0] if row.leaf == "moe_gate" else _LAYER[row.leaf]) + ".weight"
            if row.leaf == "moe_gate" and not ckpt.has(hf):
                hf = p + _FUSED_ROUTER + ".weight"
            permute = row.leaf in ("wq", "wk") and spec.arch not in schema.NEOX_ROPE
            heads = (spec.n_heads if row.leaf == "wq" else spec.n_kv_heads) if permute else 0
            out[name] = Source(ckpt, hf, shape, heads=heads)
    return out


def _expert_source(ckpt: Checkpoint, spec: ModelSpec, layer: int, expert: int, leaf: str, shape: tuple) -> Source:
    p = f"model.layers.{layer}."
    _, per_expert, names = _MOE[spec.arch]
    hf = p + per_expert.format(e=expert) + names[leaf] + ".weight"
    if ckpt.has(hf):
        return Source(ckpt, hf, shape)
    fused = p + _FUSED
    if leaf == "w2":
        return Source(ckpt, fused + "down_proj", shape, index=expert)
    ff = spec.ffn_dim
    return Source(ckpt, fused + "gate_up_proj", shape, index=expert,
                  rows=slice(0, ff) if leaf == "w1" else slice(ff, 2 * ff))


def rope_factors(spec: ModelSpec) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` for Llama 3.1 scaling (a divisor per frequency), else None."""
    if spec.rope_type != "llama3.1":
        return None
    hd, orig = spec.head_dim, spec.rope_scaling_orig_max_seq_len
    low, high, factor = (spec.rope_scaling_low_freq_factor, spec.rope_scaling_high_freq_factor,
                         spec.rope_scaling_factor)
    freqs = 1.0 / spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    out = np.where(wavelen < orig / high, 1.0,
                   np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)
