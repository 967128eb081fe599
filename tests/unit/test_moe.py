"""Mixture of experts computed by expert (dllama.model.moe): the routing and grouping against plain numpy,
the expert FFNs against a float64 row-by-row twin, and whole models' prompt batches against the same
prompt fed one token at a time (where every row is routed and computed on its own)."""

from __future__ import annotations

import dataclasses

import naive
import numpy as np
import pytest

from dllama import kernels as K
from dllama import quants, schema
from dllama.formats.loader import Tensor
from dllama.formats.spec import ModelSpec
from dllama.model.moe import MoeScratch, moe_ffn, route


@pytest.mark.parametrize("n, n_exp, k", [(32, 8, 2), (32, 128, 8), (1, 4, 2), (5, 3, 3)])
def test_route_groups_each_rows_top_k(n, n_exp, k):
    rng = np.random.default_rng(n_exp)
    logits = rng.standard_normal((n, n_exp)).astype(np.float32)
    s = MoeScratch(ModelSpec(dim=8, n_experts=n_exp, n_active_experts=k), n)
    n_hit = route(logits, k, s.top, s.rows, s.weights, s.offsets, s.hit)
    want_rows = {e: [] for e in range(n_exp)}
    want_w = {}
    for i in range(n):
        top = np.argsort(-logits[i].astype(np.float64), kind="stable")[:k]
        p = np.exp(logits[i, top].astype(np.float64) - logits[i, top].max())
        for e, w in zip(top, p / p.sum()):
            want_rows[int(e)].append(i)
            want_w[(i, int(e))] = w
    hit = [e for e in range(n_exp) if want_rows[e]]
    assert list(s.hit[:n_hit]) == hit
    assert s.offsets[0] == 0 and s.offsets[n_exp] == n * k
    for e in range(n_exp):
        a, b = s.offsets[e], s.offsets[e + 1]
        assert list(s.rows[a:b]) == want_rows[e], e
        np.testing.assert_allclose(s.weights[a:b], [want_w[(i, e)] for i in want_rows[e]], rtol=1e-6)


def _naive_moe(xb, gate, experts, k, act):
    """Row by row in float64: softmax over the router's top k, each chosen expert's GLU FFN, weighted sum."""
    y = np.zeros(xb.shape, np.float64)
    glu = naive.gelu_glu if act == "gelu" else naive.swiglu
    for i, x in enumerate(xb.astype(np.float64)):
        logits = gate @ x
        top = np.argsort(-logits, kind="stable")[:k]
        p = np.exp(logits[top] - logits[top].max())
        for e, w in zip(top, p / p.sum()):
            w1, w2, w3 = experts[e]
            h = np.concatenate([w1 @ x, w3 @ x])[None]
            y[i] += w * (w2 @ glu(h, w1.shape[0])[0])
    return y


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_moe_ffn_matches_row_by_row_float64(act):
    """F32 weights: the by-expert batch equals the float64 row-by-row sum to float rounding (1e-5 of max)."""
    dim, ffn, n_exp, k, n = 64, 96, 8, 2, 32
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((n, dim)).astype(np.float32)
    gate = rng.standard_normal((n_exp, dim)).astype(np.float32)
    mats = [[rng.standard_normal(shape).astype(np.float32) / 8 for shape in ((ffn, dim), (dim, ffn), (ffn, dim))]
            for _ in range(n_exp)]

    class Expert:
        def __init__(self, w1, w2, w3):
            self.w1, self.w2, self.w3 = (K.pack("f32", w.view(np.uint8).ravel(), *w.shape) for w in (w1, w2, w3))

    h, hb = np.zeros((n, 2 * ffn), np.float32), np.zeros((n, ffn), np.float32)

    def expert_ffn(ex, x, out):   # the engine's FFN: [w1 x | w3 x], gated activation, w2
        m = x.shape[0]
        K.matmul(ex.w1, x, h[:m, :ffn])
        K.matmul(ex.w3, x, h[:m, ffn:])
        (K.gelu_glu if act == "gelu" else K.swiglu)(h[:m], ffn, hb[:m])
        K.matmul(ex.w2, hb[:m], out)

    s = MoeScratch(ModelSpec(dim=dim, n_experts=n_exp, n_active_experts=k), n)
    y = np.full((n, dim), np.nan, np.float32)
    moe_ffn(s, K.pack("f32", gate.view(np.uint8).ravel(), n_exp, dim), [Expert(*m) for m in mats], k, xb, y,
            expert_ffn)
    want = _naive_moe(xb, gate.astype(np.float64), [[w.astype(np.float64) for w in m] for m in mats], k, act)
    assert np.max(np.abs(y - want)) < 1e-5 * np.max(np.abs(want))
    # the batch was computed by expert: every expert took several rows in one call
    counts = np.diff(s.offsets)
    assert counts.sum() == n * k and counts.max() > 1


BASE = ModelSpec(dim=128, hidden_dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16, vocab_size=96,
                 seq_len=64, rope_theta=10000.0, norm_eps=1e-5, weight_type="q40", n_experts=8, n_active_experts=2)
MOE_SPECS = {
    "mixtral": dataclasses.replace(BASE, arch="mixtral"),
    "qwen3_moe": dataclasses.replace(BASE, arch="qwen3_moe", rope_type="falcon", moe_hidden_dim=64),
    "grok1": dataclasses.replace(BASE, arch="grok1", rope_type="falcon", hidden_act="gelu",
                                 **schema.grok_dlm_scalings(16)),
}


@pytest.mark.parametrize("arch", list(MOE_SPECS))
def test_prompt_batch_matches_token_by_token(arch):
    """A 32-token prompt in one batch (by expert) against the same tokens one per forward pass (each row
    routed and computed alone, as the row-wise path did): Q40 experts, whose Q80 activations are rounded
    per row either way, so only summation order differs (1e-4 of max; measured about 1e-6)."""
    from unit.test_tensor_parallel import build, random_tensors

    spec = MOE_SPECS[arch]
    tensors = random_tensors(spec)
    rng = np.random.default_rng(2)
    for name, t in tensors.items():   # routers of O(1) rows: no near-ties that rounding could flip
        if name.endswith("moe_gate"):
            w = rng.standard_normal(t.shape).astype(np.float32)
            tensors[name] = Tensor(name, "f32", t.shape, quants.quantize("f32", w).reshape(-1))
    ids = rng.integers(0, spec.vocab_size, 32)
    batch = build(spec, tensors, 1)[0]
    batch.reset_batch(32)
    got = batch.forward(ids, np.arange(32, dtype=np.int64)).copy()
    assert np.diff(batch.moe.offsets).max() > 1   # the last layer's experts took several rows each
    single = build(spec, tensors, 1)[0]
    for t in range(32):
        want = single.forward(ids[t:t + 1], np.array([t], np.int64))
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want)), arch
