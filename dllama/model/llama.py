"""The forward pass of one node's slice of a Llama-family model (Llama 2/3/3.1/3.2, Mistral, SmolLM2,
TinyLlama; Qwen3; Mixtral-style mixture of experts; Grok-1).

One node holds its query/KV heads, its FFN rows and its vocabulary rows (see `partition`). Every node runs
this same code; where the nodes must exchange activations it calls the collective (`coll`), which is a no-op
on one node. Matrices are packed for the kernels once, at load; the per-token path only fills buffers
allocated here.
"""

from __future__ import annotations

import numpy as np

from dllama import kernels as K
from dllama import schema
from dllama.formats.spec import ModelSpec
from dllama.model.collective import Collective
from dllama.model.kvcache import KVCache
from dllama.model.moe import MoeScratch, moe_ffn
from dllama.model.partition import NodeSlice
from dllama.quants import dequantize


class Layer:
    """A layer's (or an expert's) tensors, one field per schema row, plus its experts."""

    __slots__ = schema.LAYER_FIELDS + ("experts",)

    def __init__(self):
        for s in self.__slots__:
            setattr(self, s, None)


class NodeModel:
    """The weights of one node's slice and the scratch of its forward pass; the sequences' K/V live in
    `kv`, one stretch per conversation slot (`n_slots` of `seq_len` positions each)."""

    def __init__(self, spec: ModelSpec, node: NodeSlice, seq_len: int, max_batch: int, coll: Collective,
                 n_slots: int = 1):
        self.spec, self.node, self.seq_len, self.max_batch, self.coll = spec, node, seq_len, max_batch, coll
        hd = spec.head_dim
        self.n_heads = len(node.heads)          # this node's query heads
        self.n_kv = len(node.kv_heads)          # this node's KV heads
        # an uneven split may start a node inside a KV head's group of query heads
        self.group = spec.n_heads // spec.n_kv_heads
        self.first = node.heads.start - node.kv_heads.start * self.group
        self.q_dim, self.kv_dim = self.n_heads * hd, self.n_kv * hd
        self.ffn = len(node.ffn)
        self.layers = [Layer() for _ in range(spec.n_layers)]
        self.norm = None
        self.wcls = None
        self.tok_embd = None                    # root only: stays memory-mapped, one row read per token
        self._pending: dict[str, tuple] = {}
        self.cos, self.sin = K.rope_tables(spec, seq_len)
        self.neox = spec.rope_type == "falcon"
        self.kv = KVCache(spec.n_layers, n_slots, seq_len, self.kv_dim)
        self._alloc(max_batch)

    def _alloc(self, b: int) -> None:
        s, f32 = self.spec, np.float32
        self.x = np.zeros((b, s.dim), f32)       # residual stream
        self.xb = np.zeros((b, s.dim), f32)      # normed input of a block
        self.y = np.zeros((b, s.dim), f32)       # partial output of wo / w2 (summed over nodes)
        self.qkv = np.zeros((b, self.q_dim + 2 * self.kv_dim), f32)
        self.q = np.zeros((b, self.q_dim), f32)
        self.k = np.zeros((b, self.kv_dim), f32)
        self.att_out = np.zeros((b, self.q_dim), f32)
        self.att = np.zeros((self.n_heads, self.seq_len), f32)
        self.bases = np.zeros(b, np.int64)       # each row's slot's first cache row
        self.h = np.zeros((b, 2 * self.ffn), f32)
        self.hb = np.zeros((b, self.ffn), f32)
        # a row of logits per sequence of a batch (np.zeros maps lazily: unused rows cost nothing)
        self.logits_part = np.zeros((b, len(self.node.vocab)), f32)
        self.logits = np.zeros((b, s.vocab_size), f32)
        self.moe = MoeScratch(s, b) if s.n_experts else None

    # ---- loading ---------------------------------------------------------------------------------

    def load(self, name: str, qtype: str, shape: tuple, raw: np.ndarray) -> None:
        """Take one tensor of this node's slice (as cut by `partition.slice_tensor`), as its schema row says."""
        row, i, e = schema.parse(name)
        if row.scope == schema.GLOBAL:
            owner = self
        elif row.scope == schema.LAYER:
            owner = self.layers[i]
        else:
            layer = self.layers[i]
            if layer.experts is None:
                layer.experts = [Layer() for _ in range(self.spec.n_experts)]
            owner = layer.experts[e]
        if row.take == schema.RAW:
            setattr(owner, row.leaf, (qtype, shape, raw))
        elif row.take == schema.VECTOR:
            setattr(owner, row.leaf, _vector(qtype, shape, raw))
        elif row.fuse:
            self._load_fused(owner, name, row, qtype, shape, raw)
        else:
            setattr(owner, row.leaf, K.pack(qtype, raw, *shape))

    def _load_fused(self, layer: Layer, name: str, row, qtype, shape, raw) -> None:
        """Matrices that read the same input are packed together: one kernel call instead of three (or two)."""
        leaf, fused, members = row.leaf, row.fuse, schema.FUSED[row.fuse]
        prefix = name[: -len(leaf)]
        self._pending[prefix + leaf] = (qtype, shape, raw)
        got = [self._pending.get(prefix + m) for m in members]
        if any(g is None for g in got):
            return
        for m in members:
            del self._pending[prefix + m]
        if len({g[0] for g in got}) == 1:   # one type: one packed matrix, one kernel call
            rows = sum(g[1][0] for g in got)
            raw_all = np.concatenate([np.asarray(g[2]).reshape(-1) for g in got])
            setattr(layer, fused, K.pack(got[0][0], raw_all, rows, shape[1]))
        else:
            for m, g in zip(members, got):
                setattr(layer, m, K.pack(g[0], g[2], *g[1]))

    def finish_loading(self) -> None:
        if self._pending:
            raise ValueError(f"tensors left unpaired: {sorted(self._pending)}")
        self._pending = {}

    def reset_batch(self, max_batch: int) -> None:
        if max_batch > self.max_batch:
            self.max_batch = max_batch
            self._alloc(max_batch)

    # ---- forward ---------------------------------------------------------------------------------

    def embed(self, tokens: np.ndarray, x: np.ndarray) -> None:
        qtype, (vocab, dim), raw = self.tok_embd
        row_bytes = raw.size // vocab
        for i, t in enumerate(tokens):
            row = raw[int(t) * row_bytes:(int(t) + 1) * row_bytes]
            # a .m embedding is f32: copied straight from the map; a GGUF's is often Q8_0: decoded by the
            # kernel into x; no temporary per token for either
            if qtype == "f32":
                x[i] = row.view(np.float32)
            elif qtype == "q80":
                K.dequantize_q80(row, x[i])
            else:
                x[i] = dequantize(qtype, row, 1, dim)[0]

    def forward(self, tokens: np.ndarray | None, positions: np.ndarray, logits: bool = True,
                slots: np.ndarray | None = None, out_rows: int = 1):
        """Run `len(positions)` tokens through the model, writing each row's K/V at its position in its
        slot's cache (`slots` (n,), None: all in slot 0) and attending over that slot only.

        Root: `tokens` (n,) ids -> logits (vocab,) of the last row, or (out_rows, vocab) of the last
        `out_rows` rows when more than one (None if `logits` is False), or the nodes' top candidates when
        the collective's step asked for them (dllama.candidates; a list of one entry a row for a step of
        rows).
        Workers: `tokens` is None; they follow the root's exchanges and return None.
        """
        s, coll = self.spec, self.coll
        n = len(positions)
        if not 0 < out_rows <= n:
            raise ValueError(f"{out_rows} rows of logits from a pass of {n}")
        x, xb, y = self.x[:n], self.xb[:n], self.y[:n]
        bases = self.bases[:n]
        if slots is None:
            bases[:] = 0
        else:
            for i in range(n):
                bases[i] = self.kv.base(int(slots[i]))
        if coll.is_root:
            self.embed(tokens, x)
            if s.embedding_scale:
                x *= np.float32(s.embedding_scale)
        # the only broadcast of a pass: from here every node holds the same residual stream, and each sync
        # point is one all-reduce of the partial sums, whose result every node adds itself
        coll.broadcast(x)
        for li, layer in enumerate(self.layers):
            K.rmsnorm(x, layer.attn_norm, s.norm_eps, xb)
            self._attention(layer, self.kv.k[li], self.kv.v[li], xb, positions, bases, y)
            coll.all_reduce(y)
            self._residual(x, y, layer.attn_post_norm)
            K.rmsnorm(x, layer.ffn_norm, s.norm_eps, xb)
            if s.n_experts:
                self._moe(layer, xb, y)
            else:
                self._ffn(layer, xb, y)
            coll.all_reduce(y)
            self._residual(x, y, layer.ffn_post_norm)
        if not logits:
            return None
        m = out_rows
        last = x[n - m:n]
        K.rmsnorm(last, self.norm, s.norm_eps, xb[:m])
        part = self.logits_part[:m]
        K.matmul(self.wcls, xb[:m], part)
        self._scale_logits(part)
        if coll.n_nodes == 1:
            return part[0] if m == 1 else part
        top = coll.gather(part, self.logits[:m])
        if not coll.is_root:
            return None
        if top is not None:
            return top
        return self.logits[0] if m == 1 else self.logits[:m]

    def _residual(self, x: np.ndarray, y: np.ndarray, post_norm: np.ndarray | None) -> None:
        """x += y on every node (y: the nodes' summed block output, the same on all), RMS-normed first
        where the architecture norms a block's output (Grok-1)."""
        if post_norm is not None:
            K.rmsnorm(y, post_norm, self.spec.norm_eps, y)
        x += y

    def _scale_logits(self, logits: np.ndarray) -> None:
        """Grok-1's output multiplier and (where a GGUF sets one) final soft cap, on this node's rows:
        both act per logit, so the nodes' rows stay comparable for the top candidates."""
        s = self.spec
        if s.logit_scale:
            logits *= np.float32(s.logit_scale)
        if s.final_softcap:
            cap = np.float32(s.final_softcap)
            logits /= cap
            np.tanh(logits, out=logits)
            logits *= cap

    def _attention(self, layer: Layer, k_cache: np.ndarray, v_cache: np.ndarray, xb: np.ndarray,
                   positions: np.ndarray, bases: np.ndarray, y: np.ndarray) -> None:
        n, hd, qd, kvd = len(positions), self.spec.head_dim, self.q_dim, self.kv_dim
        q, qkv = self.q[:n], self.qkv[:n]
        if layer.wqkv is not None:
            K.matmul(layer.wqkv, xb, qkv)
            q_in, k_in = qkv[:, :qd], qkv[:, qd:qd + kvd]
        else:
            q_in, k_in = q, self.k[:n]
            K.matmul(layer.wq, xb, q_in)
            K.matmul(layer.wk, xb, k_in)
            K.matmul(layer.wv, xb, qkv[:, qd + kvd:])
        if layer.q_norm is not None:   # Qwen3: every head of q and k RMS-normed on its own, before RoPE
            k = self.k[:n]
            if q_in is not q:          # fused: the norms need whole rows of heads, not column slices
                q[:] = q_in
                k[:] = k_in
            q_in, k_in = q, k
            qh, kh = q.reshape(-1, hd), k.reshape(-1, hd)
            K.rmsnorm(qh, layer.q_norm, self.spec.norm_eps, qh)
            K.rmsnorm(kh, layer.k_norm, self.spec.norm_eps, kh)
        K.rope_qkv(q_in, k_in, qkv[:, qd + kvd:], positions, self.cos, self.sin, hd, self.neox, q,
                   k_cache, v_cache, bases)
        att_out = self.att_out[:n]
        K.attention(q, k_cache, v_cache, positions, self.n_heads, self.n_kv, hd, self.att, att_out, bases,
                    self.group, self.first, self.spec.attn_scale, self.spec.attn_softcap)
        K.matmul(layer.wo, att_out, y)

    def _ffn(self, layer: Layer, xb: np.ndarray, y: np.ndarray) -> None:
        n = xb.shape[0]
        h, hb = self.h[:n], self.hb[:n]
        if layer.w13 is not None:
            K.matmul(layer.w13, xb, h)
        else:
            K.matmul(layer.w1, xb, h[:, :self.ffn])
            K.matmul(layer.w3, xb, h[:, self.ffn:])
        if self.spec.hidden_act == "gelu":
            K.gelu_glu(h, self.ffn, hb)
        else:
            K.swiglu(h, self.ffn, hb)
        K.matmul(layer.w2, hb, y)

    def _moe(self, layer: Layer, xb: np.ndarray, y: np.ndarray) -> None:
        moe_ffn(self.moe, layer.moe_gate, layer.experts, self.spec.n_active_experts, xb, y, self._ffn)


def _vector(qtype: str, shape: tuple, raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(dequantize(qtype, raw, 1, int(np.prod(shape)))[0], dtype=np.float32)
