"""The core invariant of tensor parallelism, without sockets: the same forward pass split over 1, 2 and 4
nodes (threads exchanging buffers through queues) gives the same logits and the same greedy tokens."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from dllama import quants, schema
from dllama.formats.loader import Tensor
from dllama.formats.spec import ModelSpec
from dllama.model.collective import Collective, LocalCollective
from dllama.model.llama import NodeModel
from dllama.model.partition import node_tensor_names, partition, slice_tensor

SPEC = ModelSpec(dim=128, hidden_dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=96,
                 seq_len=64, rope_theta=10000.0, norm_eps=1e-5, weight_type="q40")


def random_tensors(spec: ModelSpec, seed: int = 0, n_experts: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name in node_tensor_names(spec, partition(spec, 1)[0]):
        row = schema.parse(name)[0]
        shape = row.shape(spec)
        if len(shape) == 1:
            w = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            out[name] = Tensor(name, "f32", shape, w.view(np.uint8))
            continue
        w = rng.standard_normal(shape, dtype=np.float32) * 0.1
        qtype = "f32" if row.leaf in ("tok_embd", "moe_gate") else "q40"
        out[name] = Tensor(name, qtype, shape, quants.quantize(qtype, w).reshape(-1))
    return out


class ThreadCollective(Collective):
    """Star exchanges between threads: the same calls the socket collectives answer."""

    def __init__(self, index, n_nodes, down, up, plan):
        self.index, self.n_nodes, self.down, self.up, self.plan = index, n_nodes, down, up, plan

    def step(self, n, positions):
        if self.is_root:
            for q in self.down:
                q.put(positions)
            return positions
        return self.down[self.index - 1].get()

    def broadcast(self, x):
        if self.is_root:
            for q in self.down:
                q.put(x.copy())
        else:
            x[:] = self.down[self.index - 1].get()

    def all_reduce(self, y):
        if self.is_root:   # the workers' partials in node order, the sum back to every worker
            for q in self.up:
                y += q.get()
            for q in self.down:
                q.put(y.copy())
        else:
            self.up[self.index - 1].put(y.copy())
            y[:] = self.down[self.index - 1].get()

    def gather(self, part, out):
        if self.is_root:
            out[:, self.plan[0].vocab.start:self.plan[0].vocab.stop] = part
            for i, q in enumerate(self.up, start=1):
                v = self.plan[i].vocab
                out[:, v.start:v.stop] = q.get()
        else:
            self.up[self.index - 1].put(part.copy())


def build(spec, tensors, n_nodes, weights=None):
    plan = partition(spec, n_nodes, weights)
    down = [queue.Queue() for _ in range(n_nodes - 1)]
    up = [queue.Queue() for _ in range(n_nodes - 1)]
    models = []
    for node in plan:
        coll = LocalCollective() if n_nodes == 1 else ThreadCollective(node.index, n_nodes, down, up, plan)
        m = NodeModel(spec, node, spec.seq_len, 8, coll)
        for name in node_tensor_names(spec, node):
            part = slice_tensor(tensors[name], name, spec, node)
            if part is not None:
                m.load(name, *part)
        m.finish_loading()
        models.append(m)
    return models


def greedy(models, prompt, steps):
    """Root generates greedily while worker threads follow; returns (ids, first logits)."""
    errors = []

    def follow(m):
        try:
            while (pos := m.coll.step(0, None)) is not None:
                m.forward(None, pos)
        except BaseException as exc:   # reported by the root's thread below, not lost in this one
            errors.append(exc)
            raise

    threads = [threading.Thread(target=follow, args=(m,), daemon=True) for m in models[1:]]
    for t in threads:
        t.start()
    root = models[0]

    def fwd(tokens, start):
        pos = np.arange(start, start + len(tokens), dtype=np.int64)
        root.coll.step(len(tokens), pos)
        return root.forward(np.asarray(tokens, dtype=np.int64), pos).copy()

    for start in range(0, len(prompt), 8):   # batches of at most max_batch positions
        logits = fwd(prompt[start:start + 8], start)
    first, ids = logits, []
    for i in range(steps):
        ids.append(int(np.argmax(logits)))
        logits = fwd([ids[-1]], len(prompt) + i)
    for q in getattr(root.coll, "down", []):
        q.put(None)
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads), f"workers: {errors or 'still running'}"
    return ids, first


def test_one_two_four_nodes_agree():
    tensors = random_tensors(SPEC)
    prompt = [5, 17, 3, 60, 42, 7, 1, 88, 23]   # longer than one batch of 8: two prefill passes
    ids1, logits1 = greedy(build(SPEC, tensors, 1), prompt, 12)
    for n in (2, 4):
        ids, logits = greedy(build(SPEC, tensors, n), prompt, 12)
        np.testing.assert_allclose(logits, logits1, rtol=0, atol=1e-4)
        assert ids == ids1, f"{n} nodes"


# SmolLM2's grouping (9 query heads on 3 KV heads): 2, 4, 5 and 6 nodes cut through KV groups
GQA3 = ModelSpec(dim=96, hidden_dim=288, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=32, vocab_size=80,
                 seq_len=64, rope_theta=10000.0, norm_eps=1e-5, weight_type="q40")


@pytest.mark.parametrize("spec,n,weights", [
    (GQA3, 2, None), (GQA3, 3, None), (GQA3, 5, None), (GQA3, 6, None), (GQA3, 9, None),
    (GQA3, 3, [3, 1, 1]), (GQA3, 4, [1, 5, 2, 2]),
    (SPEC, 8, None), (SPEC, 6, [1, 1, 2, 1, 3, 1]),   # more nodes than its 4 KV heads
])
def test_uneven_splits_and_shared_kv_heads_agree_with_one_node(spec, n, weights):
    tensors = random_tensors(spec, seed=n)
    prompt = [5, 17, 3, 60, 42, 7, 1, 70, 23]
    ids1, logits1 = greedy(build(spec, tensors, 1), prompt, 6)
    ids, logits = greedy(build(spec, tensors, n, weights), prompt, 6)
    np.testing.assert_allclose(logits, logits1, rtol=0, atol=1e-4)
    assert ids == ids1


def test_one_node_matches_a_plain_numpy_forward():
    """The packed, fused, kernel-driven forward pass against a direct float64 transcription of Llama."""
    tensors = random_tensors(SPEC, seed=3)
    prompt = [1, 2, 3, 4, 5]
    models = build(SPEC, tensors, 1)
    pos = np.arange(len(prompt), dtype=np.int64)
    ours = models[0].forward(np.asarray(prompt), pos).copy()
    ref = naive_forward(SPEC, tensors, prompt)
    # our matmuls see Q80-quantized activations (as llama.cpp's): about 1% of the logit spread
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()
    assert int(np.argmax(ours)) == int(np.argmax(ref))


def naive_forward(spec, tensors, tokens):
    def w(name):
        t = tensors[name]
        rows = t.shape[0] if len(t.shape) == 2 else 1
        return quants.dequantize(t.qtype, t.data, rows, t.shape[-1]).astype(np.float64).squeeze()

    def rmsnorm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.norm_eps) * g

    hd, n = spec.head_dim, len(tokens)
    freqs = spec.rope_theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # (n, heads, hd), adjacent pairs
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    x = w("tok_embd")[tokens]
    group = spec.n_heads // spec.n_kv_heads
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        h = rmsnorm(x, w(p + "attn_norm"))
        q = rope((h @ w(p + "wq").T).reshape(n, spec.n_heads, hd))
        k = rope((h @ w(p + "wk").T).reshape(n, spec.n_kv_heads, hd))
        v = (h @ w(p + "wv").T).reshape(n, spec.n_kv_heads, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", s, v).reshape(n, -1)
        x = x + att @ w(p + "wo").T
        h = rmsnorm(x, w(p + "ffn_norm"))
        a, b = h @ w(p + "w1").T, h @ w(p + "w3").T
        x = x + (a / (1 + np.exp(-a)) * b) @ w(p + "w2").T
    return (rmsnorm(x[-1], w("norm")) @ w("wcls").T).astype(np.float32)


@pytest.mark.parametrize("n", [2, 4])
def test_worker_holds_only_its_share(n):
    tensors = random_tensors(SPEC)
    models = build(SPEC, tensors, n)
    full = sum(m.wcls.nbytes + sum(l.wqkv.nbytes + l.wo.nbytes + l.w13.nbytes + l.w2.nbytes
                                   for l in m.layers) for m in build(SPEC, tensors, 1))
    for m in models:
        held = m.wcls.nbytes + sum(l.wqkv.nbytes + l.wo.nbytes + l.w13.nbytes + l.w2.nbytes for l in m.layers)
        assert abs(held - full / n) <= 0.1 * full / n
