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
from dllama.model.moe import MoeScratch, moe_ffn
from dllama.model.partition import NodeSlice
from dllama.quants import dequantize


class Layer:
    """A layer's (or an expert's) tensors, one field per schema row, plus its experts and KV cache."""

    __slots__ = schema.LAYER_FIELDS + ("experts", "k_cache", "v_cache")

    def __init__(self):
        for s in self.__slots__:
            setattr(self, s, None)


class NodeModel:
    def __init__(self, spec: ModelSpec, node: NodeSlice, seq_len: int, max_batch: int, coll: Collective):
        self.spec, self.node, self.seq_len, self.max_batch, self.coll = spec, node, seq_len, max_batch, coll
        hd = spec.head_dim
        self.n_heads = len(node.heads)          # this node's query heads
        self.n_kv = len(node.kv_heads)          # this node's KV heads
        self.q_dim, self.kv_dim = self.n_heads * hd, self.n_kv * hd
        self.ffn = len(node.ffn)
        self.layers = [Layer() for _ in range(spec.n_layers)]
        self.norm = None
        self.wcls = None
        self.tok_embd = None                    # root only: stays memory-mapped, one row read per token
        self._pending: dict[str, tuple] = {}
        self.cos, self.sin = K.rope_tables(spec, seq_len)
        self.neox = spec.rope_type == "falcon"
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
        self.h = np.zeros((b, 2 * self.ffn), f32)
        self.hb = np.zeros((b, self.ffn), f32)
        self.logits_part = np.zeros((1, len(self.node.vocab)), f32)
        self.logits = np.zeros((1, s.vocab_size), f32)
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

    def forward(self, tokens: np.ndarray | None, positions: np.ndarray, logits: bool = True):
        """Run `len(positions)` tokens through the model, writing their K/V at `positions`.

        Root: `tokens` (n,) ids -> logits (vocab,) of the last position (None if `logits` is False), or the
        nodes' top candidates when the collective's step asked for them (dllama.candidates).
        Workers: `tokens` is None; they follow the root's exchanges and return None.
        """
        s, coll = self.spec, self.coll
        n = len(positions)
        x, xb, y = self.x[:n], self.xb[:n], self.y[:n]
        if coll.is_root:
            self.embed(tokens, x)
            if s.embedding_scale:
                x *= np.float32(s.embedding_scale)
        for layer in self.layers:
            coll.broadcast(x)
            K.rmsnorm(x, layer.attn_norm, s.norm_eps, xb)
            self._attention(layer, xb, positions, y)
            coll.reduce_sum(y)
            self._residual(x, y, layer.attn_post_norm)
            coll.broadcast(x)
            K.rmsnorm(x, layer.ffn_norm, s.norm_eps, xb)
            if s.n_experts:
                self._moe(layer, xb, y)
            else:
                self._ffn(layer, xb, y)
            coll.reduce_sum(y)
            self._residual(x, y, layer.ffn_post_norm)
        if not logits:
            return None
        last = x[n - 1:n]
        coll.broadcast(last)
        K.rmsnorm(last, self.norm, s.norm_eps, xb[:1])
        K.matmul(self.wcls, xb[:1], self.logits_part)
        self._scale_logits(self.logits_part)
        if coll.n_nodes == 1:
            return self.logits_part[0]
        top = coll.gather(self.logits_part, self.logits)
        if not coll.is_root:
            return None
        return self.logits[0] if top is None else top

    def _residual(self, x: np.ndarray, y: np.ndarray, post_norm: np.ndarray | None) -> None:
        """x += y on the root, y (the nodes' summed block output) RMS-normed first where the
        architecture norms a block's output (Grok-1)."""
        if not self.coll.is_root:
            return
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

    def _attention(self, layer: Layer, xb: np.ndarray, positions: np.ndarray, y: np.ndarray) -> None:
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
        if layer.k_cache is None:
            # np.zeros maps lazily: only the positions used become resident
            layer.k_cache = np.zeros((self.seq_len, kvd), np.float32)
            layer.v_cache = np.zeros((self.seq_len, kvd), np.float32)
        K.rope_qkv(q_in, k_in, qkv[:, qd + kvd:], positions, self.cos, self.sin, hd, self.neox, q,
                   layer.k_cache, layer.v_cache)
        att_out = self.att_out[:n]
        K.attention(q, layer.k_cache, layer.v_cache, positions, self.n_heads, self.n_kv, hd, self.att, att_out,
                    self.spec.attn_scale, self.spec.attn_softcap)
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
