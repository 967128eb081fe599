"""The tensor schema: the one place that says which tensors an architecture has.

Each row (like gguf-py's MODEL_TENSORS) gives a tensor's internal name, its shape from the ModelSpec, how
it splits across nodes, which architectures have it, its GGUF name, its type in a `.m` file, and how a
node takes it (packed matrix, f32 vector, kept raw). The rows are in `.m` file order. The partition
plan, the `.m` layout, the GGUF name map and the forward pass's layer fields are all read from here, so
adding an architecture starts with its rows (docs/architecture.md).

Internal names: `tok_embd`, `norm`, `wcls`; `layers.{i}.{leaf}`; `layers.{i}.experts.{e}.{leaf}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from gguf import MODEL_TENSOR as G
from gguf import TENSOR_NAMES

from dllama.formats.spec import ModelSpec

# How a tensor splits across nodes (partition.NodeSlice says which heads, FFN rows, vocabulary rows).
ROWS_HEADS, ROWS_KV, ROWS_FFN, ROWS_VOCAB = "rows_heads", "rows_kv", "rows_ffn", "rows_vocab"
COLS_HEADS, COLS_FFN = "cols_heads", "cols_ffn"
WHOLE = "whole"        # every node holds all of it (norms, the router)
ROOT_ONLY = "root"     # only the root holds it (the token embedding)

# How a node takes its slice: a packed matrix for the kernels, an f32 vector, or the raw bytes
MATRIX, VECTOR, RAW = "matrix", "vector", "raw"

# Where a tensor lives: once per model, once per layer, once per expert of a layer
GLOBAL, LAYER, EXPERT = "global", "layer", "expert"

ARCHS = ("llama", "mixtral", "grok1", "qwen3", "qwen3_moe")
QK_NORM = frozenset({"qwen3", "qwen3_moe"})
GROK = frozenset({"grok1"})

# rotated as halves (neox): their Q/K rows are stored in HF's order, in GGUF and `.m` alike
NEOX_ROPE = frozenset({"grok1", "qwen3", "qwen3_moe"})
# GGUF `general.architecture` -> our architecture (without experts, with experts); None: not read
GGUF_ARCHS = {"llama": ("llama", "mixtral"), "qwen3": ("qwen3", None), "qwen3moe": (None, "qwen3_moe"),
              "grok": (None, "grok1")}
GELU = frozenset({"grok1"})   # GELU experts; every other architecture is SiLU

# Grok-1's scalings: ModelSpec field -> (GGUF key after "grok.", llama.cpp's value when the key is absent).
# llama.cpp reads a router soft cap too but never applies it, so neither does dllama.
GROK_SCALINGS = {
    "embedding_scale": ("embedding_scale", 78.38367176906169),
    "attn_scale": ("attention.output_scale", 0.08838834764831845),
    "attn_softcap": ("attn_logit_softcapping", 30.0),
    "logit_scale": ("logit_scale", 0.5773502691896257),
    "final_softcap": ("final_logit_softcapping", 0.0),
}


def grok_dlm_scalings(head_dim: int) -> dict:
    """The scalings of a Grok-1 `.m` file, whose header has no keys for them: the multipliers the
    reference hard-codes, its 1/sqrt(head_dim) on q.k (llama.cpp's default for Grok-1's 128-wide heads)
    and Grok-1's soft cap of 30, which llama.cpp applies and the Oct 2024 reference left out."""
    out = {f: default for f, (_, default) in GROK_SCALINGS.items()}
    out["attn_scale"] = 1.0 / head_dim ** 0.5
    return out


WEIGHT = "weight"      # `.m` stores it in the file's weight type (else "f32")


@dataclass(frozen=True)
class TensorDef:
    leaf: str                                # internal name's last part
    scope: str                               # GLOBAL | LAYER | EXPERT
    shape: Callable[[ModelSpec], tuple]      # (rows, cols) or (n,): rows are output features
    split: str                               # ROWS_* | COLS_* | WHOLE | ROOT_ONLY
    take: str                                # MATRIX | VECTOR | RAW
    gguf: G | None                           # the GGUF tensor (`.weight` appended); stacked for experts
    dlm_type: str = WEIGHT                   # its type in a `.m` file: WEIGHT or a quant name
    dlm_type_2024: str | None = None         # where an Oct 2024 `.m` file stores it otherwise
    archs: frozenset | None = None           # None: every architecture
    moe: bool | None = None                  # True: only with experts, False: only without, None: both
    fuse: str | None = None                  # matrices read by one kernel call: their packed name

    def applies(self, spec: ModelSpec) -> bool:
        return ((self.archs is None or spec.arch in self.archs)
                and (self.moe is None or self.moe == bool(spec.n_experts)))

    def gguf_name(self, layer: int | None = None) -> str:
        return TENSOR_NAMES[self.gguf].format(bid=layer) + ".weight"


def _ffn_rows(scope: str, moe: bool, gate: G, down: G, up: G) -> list[TensorDef]:
    ffn_in = lambda s: (s.ffn_dim, s.dim)   # noqa: E731
    return [TensorDef("w1", scope, ffn_in, ROWS_FFN, MATRIX, gate, moe=moe, fuse="w13"),
            TensorDef("w2", scope, lambda s: (s.dim, s.ffn_dim), COLS_FFN, MATRIX, down, moe=moe),
            TensorDef("w3", scope, ffn_in, ROWS_FFN, MATRIX, up, moe=moe, fuse="w13")]


# In `.m` file order (the 2025 key set; `dlm_rows` gives the 2024 one).
ROWS: tuple[TensorDef, ...] = (
    TensorDef("tok_embd", GLOBAL, lambda s: (s.vocab_size, s.dim), ROOT_ONLY, RAW, G.TOKEN_EMBD, dlm_type="f32"),
    TensorDef("wq", LAYER, lambda s: (s.q_dim, s.dim), ROWS_HEADS, MATRIX, G.ATTN_Q, fuse="wqkv"),
    TensorDef("wk", LAYER, lambda s: (s.kv_dim, s.dim), ROWS_KV, MATRIX, G.ATTN_K, fuse="wqkv"),
    TensorDef("wv", LAYER, lambda s: (s.kv_dim, s.dim), ROWS_KV, MATRIX, G.ATTN_V, fuse="wqkv"),
    TensorDef("wo", LAYER, lambda s: (s.dim, s.q_dim), COLS_HEADS, MATRIX, G.ATTN_OUT),
    # the reference's 2025 converter stores the router in f32, its 2024 one in the weight type
    TensorDef("moe_gate", LAYER, lambda s: (s.n_experts, s.dim), WHOLE, MATRIX, G.FFN_GATE_INP,
              dlm_type="f32", dlm_type_2024=WEIGHT, moe=True),
    *_ffn_rows(EXPERT, True, G.FFN_GATE_EXP, G.FFN_DOWN_EXP, G.FFN_UP_EXP),
    *_ffn_rows(LAYER, False, G.FFN_GATE, G.FFN_DOWN, G.FFN_UP),
    TensorDef("q_norm", LAYER, lambda s: (s.head_dim,), WHOLE, VECTOR, G.ATTN_Q_NORM, "f32", archs=QK_NORM),
    TensorDef("k_norm", LAYER, lambda s: (s.head_dim,), WHOLE, VECTOR, G.ATTN_K_NORM, "f32", archs=QK_NORM),
    TensorDef("attn_norm", LAYER, lambda s: (s.dim,), WHOLE, VECTOR, G.ATTN_NORM, "f32"),
    # Grok-1: `.m` order rmsAtt, rmsFfn, rmsMoe, rmsFfn2, where rmsFfn normalises the attention output
    TensorDef("attn_post_norm", LAYER, lambda s: (s.dim,), WHOLE, VECTOR, G.ATTN_OUT_NORM, "f32", archs=GROK),
    TensorDef("ffn_norm", LAYER, lambda s: (s.dim,), WHOLE, VECTOR, G.FFN_NORM, "f32"),
    TensorDef("ffn_post_norm", LAYER, lambda s: (s.dim,), WHOLE, VECTOR, G.LAYER_OUT_NORM, "f32", archs=GROK),
    TensorDef("norm", GLOBAL, lambda s: (s.dim,), WHOLE, VECTOR, G.OUTPUT_NORM, "f32"),
    TensorDef("wcls", GLOBAL, lambda s: (s.vocab_size, s.dim), ROWS_VOCAB, MATRIX, G.OUTPUT),
)
BY_LEAF = {}
for _r in ROWS:
    BY_LEAF.setdefault(_r.leaf, []).append(_r)
# the fields a layer (or an expert) holds: every layer-scope leaf and every fused matrix
LAYER_FIELDS = tuple(dict.fromkeys([r.leaf for r in ROWS if r.scope != GLOBAL]
                                   + [r.fuse for r in ROWS if r.fuse]))
FUSED = {f: tuple(r.leaf for r in ROWS if r.fuse == f and r.scope == LAYER) for f in {r.fuse for r in ROWS if r.fuse}}

# 2024 `.m` files: each expert as up, gate, down
_DLM_2024_EXPERT = ("w3", "w1", "w2")


def rows_for(spec: ModelSpec) -> list[TensorDef]:
    """The schema rows `spec`'s architecture has, in `.m` (2025) order."""
    return [r for r in ROWS if r.applies(spec)]


def entries(spec: ModelSpec, rows: list[TensorDef] | None = None) -> Iterator[tuple[str, TensorDef, tuple]]:
    """(internal name, row, (layer, expert)) of every tensor of `spec`, in `.m` order: the global rows
    listed before the layer rows, every layer, the global rows after. Experts of a layer follow its
    router; each expert's tensors are consecutive."""
    rows = rows_for(spec) if rows is None else rows
    first_layer_row = next(i for i, r in enumerate(rows) if r.scope != GLOBAL)
    for r in rows[:first_layer_row]:
        yield r.leaf, r, (None, None)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        experts_done = False
        for r in rows:
            if r.scope == LAYER:
                yield p + r.leaf, r, (i, None)
            elif r.scope == EXPERT and not experts_done:
                experts_done = True
                group = [x for x in rows if x.scope == EXPERT]
                for e in range(spec.n_experts):
                    for x in group:
                        yield f"{p}experts.{e}.{x.leaf}", x, (i, e)
    for r in rows[first_layer_row:]:
        if r.scope == GLOBAL:
            yield r.leaf, r, (None, None)


def dlm_rows(spec: ModelSpec, kset: str) -> list[TensorDef]:
    """The rows in the order a `.m` file of key set `kset` ('2024' or '2025') stores them."""
    rows = rows_for(spec)
    if kset == "2024":
        experts = {r.leaf: r for r in rows if r.scope == EXPERT}
        if experts:
            at = next(i for i, r in enumerate(rows) if r.scope == EXPERT)
            rows = [r for r in rows if r.scope != EXPERT]
            rows[at:at] = [experts[leaf] for leaf in _DLM_2024_EXPERT]
    return rows


def dlm_type(r: TensorDef, spec: ModelSpec, kset: str) -> str:
    """The type a `.m` file of key set `kset` stores row `r` in."""
    t = r.dlm_type_2024 if kset == "2024" and r.dlm_type_2024 else r.dlm_type
    return spec.weight_type if t == WEIGHT else t


_NAME = re.compile(r"layers\.(\d+)\.(?:experts\.(\d+)\.)?(\w+)")


def parse(name: str) -> tuple[TensorDef, int | None, int | None]:
    """(row, layer, expert) of an internal name. Raises KeyError for a name the schema lacks."""
    m = _NAME.fullmatch(name)
    if m is None:
        return _one(name, GLOBAL), None, None
    layer, expert, leaf = m.groups()
    scope = LAYER if expert is None else EXPERT
    return _one(leaf, scope), int(layer), None if expert is None else int(expert)


def _one(leaf: str, scope: str) -> TensorDef:
    for r in BY_LEAF.get(leaf, ()):
        if r.scope == scope:
            return r
    raise KeyError(leaf)
