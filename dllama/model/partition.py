"""Who owns what: the tensor-parallel split of a model across nodes, as a pure function.

Megatron-style, as in Meta's `model.py`: q/k/v and w1/w3 are split by output rows (column-parallel), wo and
w2 by input columns (row-parallel), and the nodes' partial outputs of wo and w2 are summed. A node owns a
contiguous range of query heads, a contiguous range of FFN rows (for MoE models the same rows of every
expert) and a range of output-vocabulary rows, each sized by the node's weight (its measured or given
speed). A node holds the KV heads its query heads read: where a KV head's query heads fall on two nodes,
both compute that head's K and V (a small duplicate: K/V are 1/group of the attention's rows) and each
attends with its own query heads only, so attention still needs no exchange.

Column cuts (of wo and w2) fall on block boundaries of the weight type; row cuts may fall anywhere.

The root (node 0) also holds the token embedding and runs the sampler.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from dllama import quants, schema
from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec

BLOCK = quants.BLOCK_SIZE  # the smallest column alignment: a GGUF mixes Q8_0 into files of any type


@dataclass(frozen=True)
class NodeSlice:
    index: int
    n_nodes: int
    heads: range      # query heads
    kv_heads: range   # key/value heads: those the query heads read (shared with a neighbour at the edges)
    ffn: range        # rows of w1/w3, columns of w2 (per expert)
    vocab: range      # rows of wcls
    weights: tuple = field(default=())   # the plan's per-node weights; () for an even split

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("heads", "kv_heads", "ffn", "vocab"):
            r = getattr(self, key)
            d[key] = [r.start, r.stop]
        d["weights"] = list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NodeSlice":
        return cls(index=d["index"], n_nodes=d["n_nodes"], weights=tuple(d.get("weights") or ()),
                   **{k: range(*d[k]) for k in ("heads", "kv_heads", "ffn", "vocab")})


def column_align(spec: ModelSpec) -> int:
    """Values a column cut must be a multiple of: the block of the model's weight type, at least BLOCK."""
    try:
        block = quants.quant(spec.weight_type).block_size
    except DllamaError:
        block = BLOCK
    return max(BLOCK, block)


def cuts(total: int, weights: list[float], unit: int) -> list[int]:
    """Cut points 0 = c_0 < c_1 < ... < c_n = total splitting `total` items by `weights`: every inner cut
    a multiple of `unit`, every range non-empty, each within `unit` of its weight's share when every share
    is at least a unit. Raises DllamaError when `total` does not hold a unit per range."""
    n, units = len(weights), -(-total // unit)
    if n > units:
        raise DllamaError(f"{total} split in units of {unit} gives {units} parts, fewer than {n}")
    w_sum, acc, c = float(sum(weights)), 0.0, [0]
    for w in weights[:-1]:
        acc += w
        c.append(math.floor(total * acc / w_sum / unit + 0.5))
    c.append(units)
    for k in range(1, n):           # every range at least one unit: only shares under a unit move
        c[k] = max(c[k], c[k - 1] + 1)
    for k in range(n - 1, 0, -1):
        c[k] = min(c[k], c[k + 1] - 1)
    return [min(x * unit, total) for x in c]


def _ranges(total: int, weights: list[float], unit: int) -> list[range]:
    c = cuts(total, weights, unit)
    return [range(a, b) for a, b in zip(c, c[1:])]


def head_unit(spec: ModelSpec) -> int:
    """Query heads per unit of the split: the fewest whole heads whose `wo` columns fill whole blocks."""
    align = column_align(spec)
    return align // math.gcd(align, spec.head_dim)


def max_nodes(spec: ModelSpec) -> int:
    """The most nodes `spec` splits over: one unit of query heads (and of FFN columns) each."""
    return max(1, min(-(-spec.n_heads // head_unit(spec)), -(-spec.ffn_dim // column_align(spec)),
                      spec.vocab_size))


def valid_node_counts(spec: ModelSpec) -> list[int]:
    return list(range(1, max_nodes(spec) + 1))


def _why_not(spec: ModelSpec, n: int, weights) -> str | None:
    """Why `spec` cannot be split over `n` nodes with `weights`, or None if it can."""
    if n < 1:
        return "there must be at least one node"
    if n > max_nodes(spec):
        unit = head_unit(spec)
        heads = f"{spec.n_heads} query heads" + (f" ({unit} to a {column_align(spec)}-value block)" if unit > 1 else "")
        return f"it has {heads} and an FFN width of {spec.ffn_dim}: at most {max_nodes(spec)} nodes"
    if weights is not None:
        if len(weights) != n:
            return f"{len(weights)} split weights were given for {n} nodes"
        bad = [w for w in weights if not _positive(w)]
        if bad:
            return f"split weight {bad[0]!r} is not a positive number"
    return None


def _positive(w) -> bool:
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        return False
    try:
        return math.isfinite(w) and w > 0
    except OverflowError:   # an integer past any float: from a CONFIG, not a speed
        return False


def partition(spec: ModelSpec, n_nodes: int, weights=None) -> list[NodeSlice]:
    """Split `spec` over `n_nodes` nodes, node i's shares following `weights[i]` (None: even).

    Raises DllamaError, naming the reason and the node counts that would work, when the model cannot be
    split so (more nodes than units of query heads or of FFN blocks) or the weights are not n positive
    numbers.
    """
    why = _why_not(spec, n_nodes, weights)
    if why:
        raise DllamaError(f"this model cannot be split over {n_nodes} nodes ({why}); "
                          f"node counts that work: 1 to {max_nodes(spec)}")
    w = [1.0] * n_nodes if weights is None else [float(x) for x in weights]
    group = spec.n_heads // spec.n_kv_heads
    heads = _ranges(spec.n_heads, w, head_unit(spec))
    ffn = _ranges(spec.ffn_dim, w, column_align(spec))
    vocab = _ranges(spec.vocab_size, w, 1)
    kept = () if weights is None else tuple(w)   # floats: 2 and 2.0 are one plan, on the wire and in its digest
    return [
        NodeSlice(index=i, n_nodes=n_nodes, heads=heads[i],
                  kv_heads=range(heads[i].start // group, -(-heads[i].stop // group)),
                  ffn=ffn[i], vocab=vocab[i], weights=kept)
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
    r = _cut(kind, spec, node)
    matrix = tensor.data.reshape(rows, quants.row_bytes(tensor.qtype, cols))
    if kind.startswith("rows"):
        return tensor.qtype, (len(r), cols), matrix[r.start:r.stop].reshape(-1)
    why = _cut_inside_block(name, tensor.qtype, r, node.n_nodes)
    if why:
        raise DllamaError(why)
    a, b = quants.row_bytes(tensor.qtype, r.start), quants.row_bytes(tensor.qtype, r.stop)
    return tensor.qtype, (rows, len(r)), np.ascontiguousarray(matrix[:, a:b]).reshape(-1)


def _cut(kind: str, spec: ModelSpec, node: NodeSlice) -> range:
    """The rows (or columns) of a split tensor that `node` holds."""
    hd = spec.head_dim
    return {schema.ROWS_HEADS: range(node.heads.start * hd, node.heads.stop * hd),
            schema.ROWS_KV: range(node.kv_heads.start * hd, node.kv_heads.stop * hd),
            schema.ROWS_FFN: node.ffn, schema.ROWS_VOCAB: node.vocab,
            schema.COLS_HEADS: range(node.heads.start * hd, node.heads.stop * hd),
            schema.COLS_FFN: node.ffn}[kind]


def slice_nbytes(tensors: dict, spec: ModelSpec, node: NodeSlice) -> int:
    """Bytes of `node`'s parts of `tensors` (what `slice_tensor` gives it, summed) without cutting any."""
    total = 0
    for name in node_tensor_names(spec, node):
        tensor, kind = tensors[name], split_kind(name)
        if kind in (schema.ROOT_ONLY, schema.WHOLE):
            total += tensor.data.nbytes if kind == schema.WHOLE or node.index == 0 else 0
            continue
        r, cols = _cut(kind, spec, node), tensor.shape[1]
        if kind.startswith("rows"):
            total += len(r) * quants.row_bytes(tensor.qtype, cols)
        else:
            row = quants.row_bytes(tensor.qtype, r.stop) - quants.row_bytes(tensor.qtype, r.start)
            total += tensor.shape[0] * row
    return total


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
