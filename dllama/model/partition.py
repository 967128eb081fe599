"""Who owns what: the tensor-parallel split of a model across nodes, as a pure function.

Megatron-style, as in Meta's `model.py`: q/k/v and w1/w3 are split by output rows (column-parallel), wo and
w2 by input columns (row-parallel), and the nodes' partial outputs of wo and w2 are summed. A node owns a
contiguous range of KV heads with their query heads (so attention needs no exchange), a contiguous range of
FFN rows (for MoE models the same rows of every expert), and a range of output-vocabulary rows.

The root (node 0) also holds the token embedding and runs the sampler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dllama import quants, schema
from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec

BLOCK = quants.BLOCK_SIZE  # a column split must not cut a block


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


def split_kind(name: str) -> str:
    return schema.parse(name)[0].split


def node_tensor_names(spec: ModelSpec, node: NodeSlice) -> list[str]:
    """The tensors a node holds, in the order the root streams them (the `.m` file order)."""
    return [name for name, r, _ in schema.entries(spec) if r.split != schema.ROOT_ONLY or node.index == 0]


def slice_tensor(tensor, name: str, spec: ModelSpec, node: NodeSlice):
    """This node's part of `tensor`: (qtype, shape, raw uint8 array), or None if the node holds none of it.

    Row slices are zero-copy views of the memory map; column slices are copied (a strided cut of every row).
    """
    kind = split_kind(name)
    if kind == schema.ROOT_ONLY:
        return (tensor.qtype, tensor.shape, tensor.data) if node.index == 0 else None
    if kind == schema.WHOLE:
        return tensor.qtype, tensor.shape, tensor.data
    rows, cols = tensor.shape
    hd = spec.head_dim
    r = {schema.ROWS_HEADS: range(node.heads.start * hd, node.heads.stop * hd),
         schema.ROWS_KV: range(node.kv_heads.start * hd, node.kv_heads.stop * hd),
         schema.ROWS_FFN: node.ffn, schema.ROWS_VOCAB: node.vocab,
         schema.COLS_HEADS: range(node.heads.start * hd, node.heads.stop * hd),
         schema.COLS_FFN: node.ffn}[kind]
    matrix = tensor.data.reshape(rows, quants.row_bytes(tensor.qtype, cols))
    if kind.startswith("rows"):
        return tensor.qtype, (len(r), cols), matrix[r.start:r.stop].reshape(-1)
    why = _cut_inside_block(name, tensor.qtype, r, node.n_nodes)
    if why:
        raise DllamaError(why)
    a, b = quants.row_bytes(tensor.qtype, r.start), quants.row_bytes(tensor.qtype, r.stop)
    return tensor.qtype, (rows, len(r)), np.ascontiguousarray(matrix[:, a:b]).reshape(-1)


def _cut_inside_block(name: str, qtype: str, cols: range, n_nodes: int) -> str | None:
    # a column slice must hold whole blocks: K-quants' are 256 values, more than the plan's BLOCK
    size = quants.quant(qtype).block_size
    if cols.start % size or cols.stop % size:
        return (f"tensor {name} ({qtype}, blocks of {size} values) cannot be split over {n_nodes} nodes: a node's "
                f"columns {cols.start}..{cols.stop} cut its blocks; run it on fewer nodes, or convert the model "
                "to a 32-value type (dllama convert)")
    return None


def check_blocks(tensors: dict, spec: ModelSpec, plan: list[NodeSlice]) -> None:
    """Raises DllamaError, naming the tensor, where `plan` would cut a block of a column-split tensor (a
    K-quant's 256-value super-block): such a plan is refused, not re-blocked, before any node loads."""
    for name, r, _ in schema.entries(spec):
        if r.split not in (schema.COLS_HEADS, schema.COLS_FFN) or name not in tensors or len(plan) == 1:
            continue
        for node in plan:
            hd = spec.head_dim
            cols = node.ffn if r.split == schema.COLS_FFN else range(node.heads.start * hd, node.heads.stop * hd)
            why = _cut_inside_block(name, tensors[name].qtype, cols, len(plan))
            if why:
                raise DllamaError(why)


def layer_of(name: str) -> int | None:
    return schema.parse(name)[1]
