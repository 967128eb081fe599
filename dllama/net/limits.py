"""What a CONFIG may ask of a worker, checked before anything is allocated.

A root holding the cluster key is trusted with the worker's CPU, not with its memory: a configuration
whose slice (weights, KV cache, RoPE tables, scratch) would not fit in the memory the worker has left is
refused with both figures, instead of swapping the machine to a halt or being killed by the OOM killer.
"""

from __future__ import annotations

import math
from dataclasses import fields

from dllama import schema
from dllama.errors import DllamaError
from dllama.net import protocol as P
from dllama.net.memory import available_bytes

MAX_SEQ_LEN = 1 << 20     # positions; past every model we know, and the RoPE tables alone would be GBs
MAX_BATCH = 1024
MAX_SLOTS = 1024          # conversation slots, each with a KV cache of seq_len positions
MAX_DIM = 1 << 17         # dim, hidden_dim, head_dim, vocab_size, heads, layers, experts
HEADROOM = 0.9            # of the available memory a slice may take: the process itself needs some


def check_config(cfg: dict, hello: P.Hello, available: int | None = None):
    """(spec, node, seq_len, max_batch, buffer_type) of a CONFIG, or DllamaError saying what is wrong."""
    from dllama.formats.spec import ModelSpec
    from dllama.model.partition import NodeSlice, partition

    if not isinstance(cfg, dict) or not isinstance(cfg.get("spec"), dict) or not isinstance(cfg.get("node"), dict):
        raise DllamaError("CONFIG must be an object with \"spec\" and \"node\" objects")
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(cfg["spec"]) - known)
    if unknown:
        raise DllamaError(f"CONFIG spec has unknown fields: {', '.join(unknown)}")
    try:
        spec, node = ModelSpec(**cfg["spec"]), NodeSlice.from_dict(cfg["node"])
        seq_len, max_batch, buffer_type = cfg["seq_len"], cfg["max_batch"], cfg["buffer_type"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DllamaError(f"malformed CONFIG: {exc}") from None
    if (node.index, node.n_nodes) != (hello.node_index, hello.n_nodes):
        raise P.ProtocolError(f"CONFIG for node {node.index} of {node.n_nodes} after HELLO as node "
                              f"{hello.node_index} of {hello.n_nodes}")
    _bounded("seq_len", seq_len, MAX_SEQ_LEN)
    _bounded("max_batch", max_batch, MAX_BATCH)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        _bounded(f"spec.{name}", getattr(spec, name), MAX_DIM)
    for name in ("hidden_dim", "n_experts", "n_active_experts", "moe_hidden_dim"):
        _bounded(f"spec.{name}", getattr(spec, name), MAX_DIM, low=0)
    if buffer_type not in P.FTYPES:
        raise DllamaError(f"CONFIG buffer_type must be one of {P.FTYPES}, got {buffer_type!r}")
    if spec.weight_type not in P.QTYPES:
        raise DllamaError(f"CONFIG weight_type must be one of {P.QTYPES}, got {spec.weight_type!r}")
    # the slice must be the one the partition gives this node: ranges out of the model are refused
    if partition(spec, node.n_nodes, node.weights or None)[node.index] != node:
        raise DllamaError(f"CONFIG node slice {cfg['node']} is not node {node.index}'s of this model")
    need = slice_bytes(spec, node, seq_len, max_batch, config_slots(cfg))
    if available is None:
        available = available_bytes()
    if available is not None and need > HEADROOM * available:
        raise DllamaError(f"the slice needs {need / 1e6:.0f} MB (weights, KV cache for {seq_len} positions "
                          f"x {config_slots(cfg)} slots, "
                          f"scratch); this worker has {available / 1e6:.0f} MB available (a slice may "
                          f"take {HEADROOM:.0%}): short by "
                          f"{(need - HEADROOM * available) / 1e6:.0f} MB")
    return spec, node, seq_len, max_batch, buffer_type


def config_slots(cfg: dict) -> int:
    """The CONFIG's number of conversation slots (1 when it names none), or DllamaError."""
    n = cfg.get("n_slots", 1)
    _bounded("n_slots", n, MAX_SLOTS)
    return n


def _bounded(name: str, value, high: int, low: int = 1) -> None:
    if type(value) is not int or not low <= value <= high:
        raise DllamaError(f"CONFIG {name} must be an integer in [{low}, {high}], got {value!r}")


def slice_bytes(spec, node, seq_len: int, max_batch: int, n_slots: int = 1) -> int:
    """An estimate of what a node holding `node` of `spec` allocates: packed weights of the model's weight
    type, a full KV cache per slot, RoPE tables, attention scores and activation buffers (f32)."""
    # packed sizes (dllama.kernels): the GGUF-only types without a kernel of their own are held as Q80
    bits = {"f32": 32, "f16": 16, "q40": 4.5, "q41": 5, "q80": 8.5, "q4k": 4.625, "q5k": 5.625,
            "q6k": 6.5625}.get(spec.weight_type, 8.5)
    hd, dim = spec.head_dim, spec.dim
    q, kv, ffn = len(node.heads) * hd, len(node.kv_heads) * hd, len(node.ffn)
    kv_cache = spec.n_layers * seq_len * kv * 2 * 4 * n_slots
    rope = seq_len * hd * 4
    scratch = (len(node.heads) * seq_len + max_batch * (3 * dim + 2 * q + 3 * kv + 3 * ffn)) * 4
    return int(weight_bytes(spec, node, bits) + kv_cache + rope + scratch)


def weight_bytes(spec, node, bits: float = 32) -> int:
    """Bytes of the node's tensors were every value `bits` wide (32: the most any tensor type takes, so an
    upper bound of what a root may stream for this slice, whatever types its file mixes), norms included."""
    hd, dim = spec.head_dim, spec.dim
    q, kv, ffn = len(node.heads) * hd, len(node.kv_heads) * hd, len(node.ffn)
    experts = max(spec.n_experts, 1)
    per_layer = (q + 2 * kv) * dim + dim * q + 3 * ffn * dim * experts + spec.n_experts * dim
    # the f32 vectors (norms) the schema gives this architecture: two to four per layer, one global
    norms = sum(math.prod(r.shape(spec)) * (spec.n_layers if r.scope == schema.LAYER else 1)
                for r in schema.rows_for(spec) if r.take == schema.VECTOR)
    return int((spec.n_layers * per_layer + len(node.vocab) * dim) * bits / 8 + norms * 4)
