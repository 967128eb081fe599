"""Who owns what: the tensor-parallel split of a model across nodes, as a pure function.

Megatron-style, as in Meta's `model.py`: q/k/v and w1/w3 are split by output rows (column-parallel), wo and
w2 by input columns (row-parallel), and the nodes' partial outputs of wo and w2 are summed. A node owns a
contiguous range of KV heads with their query heads (so attention needs no exchange), a contiguous range of
FFN rows (for MoE models the same rows of every expert), and a range of output-vocabulary rows.

The root (node 0) also holds the token embedding and runs the sampler.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec

BLOCK = 32  # values per quantization block: a column split must not cut a block


@dataclass(frozen=True)
class NodeSlice:
    index: int
    n_nodes: int
    heads: range      # query heads
    kv_heads: range   # key/value heads
    ffn: range        # rows of w1/w3, columns of w2 (per expert)
    vocab: range      # rows of wcls

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("heads", "kv_heads", "ffn", "vocab"):
            r = getattr(self, key)
            d[key] = [r.start, r.stop]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NodeSlice":
        return cls(index=d["index"], n_nodes=d["n_nodes"],
                   **{k: range(*d[k]) for k in ("heads", "kv_heads", "ffn", "vocab")})


def _ranges(n_items: int, n_nodes: int) -> list[range]:
    """Even contiguous ranges. The one place to change for uneven (weighted) splits."""
    step = n_items // n_nodes
    return [range(i * step, (i + 1) * step) for i in range(n_nodes)]


def valid_node_counts(spec: ModelSpec) -> list[int]:
    counts, n = [], 1
    while n <= spec.n_kv_heads:
        if _why_not(spec, n) is None:
            counts.append(n)
        n *= 2
    return counts


def _why_not(spec: ModelSpec, n: int) -> str | None:
    """Why `spec` cannot be split over `n` nodes, or None if it can."""
    if n < 1 or n & (n - 1):
        return "the node count must be a power of two"
    if n > spec.n_kv_heads or spec.n_kv_heads % n:
        return f"it has {spec.n_kv_heads} KV heads"
    if spec.ffn_dim % (n * BLOCK):
        return f"its FFN width {spec.ffn_dim} does not split into {BLOCK}-value blocks over {n} nodes"
    if (spec.q_dim // n) % BLOCK:
        return f"its attention width {spec.q_dim} does not split into {BLOCK}-value blocks over {n} nodes"
    return None


def partition(spec: ModelSpec, n_nodes: int) -> list[NodeSlice]:
    """Split `spec` over `n_nodes` nodes.

    Raises DllamaError, naming the reason and the node counts that would work, when the model cannot be
    split so: like the reference, node counts are powers of two and at most the number of KV heads.
    """
    why = _why_not(spec, n_nodes)
    if why:
        works = ", ".join(str(c) for c in valid_node_counts(spec))
        raise DllamaError(f"this model cannot be split over {n_nodes} nodes ({why}); node counts that work: {works}")
    group = spec.n_heads // spec.n_kv_heads
    kv = _ranges(spec.n_kv_heads, n_nodes)
    ffn = _ranges(spec.ffn_dim, n_nodes)
    vocab_step = -(-spec.vocab_size // n_nodes)
    return [
        NodeSlice(
            index=i, n_nodes=n_nodes,
            heads=range(kv[i].start * group, kv[i].stop * group),
            kv_heads=kv[i],
            ffn=ffn[i],
            vocab=range(min(i * vocab_step, spec.vocab_size), min((i + 1) * vocab_step, spec.vocab_size)),
        )
        for i in range(n_nodes)
    ]


# What each tensor's split is, by the last part of its internal name.
ROWS_HEADS, ROWS_KV, ROWS_FFN, ROWS_VOCAB = "rows_heads", "rows_kv", "rows_ffn", "rows_vocab"
COLS_HEADS, COLS_FFN, WHOLE, ROOT_ONLY = "cols_heads", "cols_ffn", "whole", "root"
_SPLIT = {
    "wq": ROWS_HEADS, "wk": ROWS_KV, "wv": ROWS_KV, "wo": COLS_HEADS,
    "w1": ROWS_FFN, "w3": ROWS_FFN, "w2": COLS_FFN,
    "wcls": ROWS_VOCAB, "tok_embd": ROOT_ONLY,
}


def split_kind(name: str) -> str:
    return _SPLIT.get(name.rsplit(".", 1)[-1], WHOLE)


def node_tensor_names(spec: ModelSpec, node: NodeSlice) -> list[str]:
    """The tensors a node holds, in the order the root streams them (the `.m` file order)."""
    names = ["tok_embd"] if node.index == 0 else []
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        names += [p + "wq", p + "wk", p + "wv", p + "wo"]
        if spec.n_experts:
            names.append(p + "moe_gate")
            for e in range(spec.n_experts):
                names += [f"{p}experts.{e}.{w}" for w in ("w1", "w2", "w3")]
        else:
            names += [p + "w1", p + "w2", p + "w3"]
        if spec.arch.startswith("qwen3"):
            names += [p + "q_norm", p + "k_norm"]
        names += [p + "attn_norm", p + "ffn_norm"]
    names += ["norm", "wcls"]
    return names


_ELEM_BYTES = {"f32": 4, "f16": 2}
_BLOCK_BYTES = {"q40": 18, "q41": 20, "q80": 34}


def _col_bytes(qtype: str, col: int) -> int:
    if qtype in _ELEM_BYTES:
        return col * _ELEM_BYTES[qtype]
    if col % BLOCK:
        raise ValueError(f"column {col} cuts a {qtype} block")
    return col // BLOCK * _BLOCK_BYTES[qtype]


def slice_tensor(tensor, name: str, spec: ModelSpec, node: NodeSlice):
    """This node's part of `tensor`: (qtype, shape, raw uint8 array), or None if the node holds none of it.

    Row slices are zero-copy views of the memory map; column slices are copied (a strided cut of every row).
    """
    kind = split_kind(name)
    if kind == ROOT_ONLY:
        return (tensor.qtype, tensor.shape, tensor.data) if node.index == 0 else None
    if kind == WHOLE:
        return tensor.qtype, tensor.shape, tensor.data
    rows, cols = tensor.shape
    hd = spec.head_dim
    r = {ROWS_HEADS: range(node.heads.start * hd, node.heads.stop * hd),
         ROWS_KV: range(node.kv_heads.start * hd, node.kv_heads.stop * hd),
         ROWS_FFN: node.ffn, ROWS_VOCAB: node.vocab,
         COLS_HEADS: range(node.heads.start * hd, node.heads.stop * hd),
         COLS_FFN: node.ffn}[kind]
    row_bytes = _col_bytes(tensor.qtype, cols)
    matrix = tensor.data.reshape(rows, row_bytes)
    if kind.startswith("rows"):
        return tensor.qtype, (len(r), cols), matrix[r.start:r.stop].reshape(-1)
    a, b = _col_bytes(tensor.qtype, r.start), _col_bytes(tensor.qtype, r.stop)
    return tensor.qtype, (rows, len(r)), np.ascontiguousarray(matrix[:, a:b]).reshape(-1)


_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None
