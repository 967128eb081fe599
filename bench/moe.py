"""A 32-token prefill of small random MoE models: experts computed by expert (dllama.model.moe) against
row by row (each row's k experts as k one-row matmuls, as dllama did before; kept here as the baseline).

    python bench/moe.py [--threads 1] [--repeat 5] [--layers 4]

Also one layer of Qwen3-30B-A3B's shape. Weights are N(0, 0.02) quantized to Q40, the router f32 N(0, 1), norms ones: rows routed apart as
trained models route them (random Q40 bytes would share a bias that sends every row to the same few). Shapes: Mixtral-like
(8 experts, top-2, FFN 2048) and Qwen3-MoE-like (64 small experts, top-8, FFN 384), dim 1024. Prints the
best wall and CPU ms of a prefill (the whole model: attention and norms included) and the expert FFN
calls per layer each way.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dllama import kernels as K
from dllama import quants, schema
from dllama.formats.spec import ModelSpec
from dllama.model.collective import LocalCollective
from dllama.model.llama import NodeModel
from dllama.model.partition import node_tensor_names, partition

N = 32
SHAPES = {
    "mixtral-like 8x top-2": dict(arch="mixtral", n_experts=8, n_active_experts=2, hidden_dim=2048),
    "qwen3moe-like 64x top-8": dict(arch="qwen3_moe", n_experts=64, n_active_experts=8, hidden_dim=3072,
                                    moe_hidden_dim=384, rope_type="falcon"),
    # one layer of Qwen3-30B-A3B's MoE shape (dim 2048, 128 experts of 768, top-8): 340 MB of Q40 experts
    "qwen3-30b-a3b layer": dict(arch="qwen3_moe", n_experts=128, n_active_experts=8, hidden_dim=6144,
                                moe_hidden_dim=768, rope_type="falcon", dim=2048, n_heads=32, n_layers=1),
}


def rowwise_moe(self, layer, xb, y):
    """The row-by-row baseline: per row, the router, a top-k and k one-row FFNs."""
    s = self.spec
    router, acc = self.moe.router[:1], self.moe.out[:1]
    y[:] = 0
    for i in range(xb.shape[0]):
        row = xb[i:i + 1]
        K.matmul(layer.moe_gate, row, router)
        logits = router[0]
        top = np.argsort(logits)[::-1][: s.n_active_experts]
        w = np.exp(logits[top] - logits[top[0]])
        w /= w.sum()
        for e, we in zip(top, w):
            self._ffn(layer.experts[int(e)], row, acc)
            y[i] += we * acc[0]


def build(spec: ModelSpec, seed: int = 0) -> NodeModel:
    rng = np.random.default_rng(seed)
    node = partition(spec, 1)[0]
    m = NodeModel(spec, node, spec.seq_len, N, LocalCollective())
    for name in node_tensor_names(spec, node):
        row = schema.parse(name)[0]
        shape = row.shape(spec)
        if len(shape) == 1:
            m.load(name, "f32", shape, np.ones(shape, np.float32).view(np.uint8))
        elif row.leaf == "tok_embd":
            m.load(name, "f32", shape, (rng.standard_normal(shape, np.float32)).view(np.uint8).ravel())
        elif row.leaf == "moe_gate":
            m.load(name, "f32", shape, rng.standard_normal(shape, np.float32).view(np.uint8).ravel())
        else:
            w = rng.standard_normal(shape, np.float32) * np.float32(0.02)
            m.load(name, "q40", shape, quants.quantize("q40", w).ravel())
    m.finish_loading()
    return m


def timed(m, ids, repeat):
    """(wall, cpu) ms of a prefill, each the best of `repeat`: on a shared host the wall time is mostly
    other processes' doing, the process's CPU time (one thread) much less so."""
    pos = np.arange(N, dtype=np.int64)
    m.forward(ids, pos)
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        m.forward(ids, pos)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 1e3 * min(wall), 1e3 * min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    K.set_threads(args.threads)
    K.warmup(("q40",))
    print(f"32-token prefill, {args.layers} layers of dim 1024 (unless named), Q40, {args.threads} thread(s): "
          "best ms, wall / CPU")
    for label, shape in SHAPES.items():
        shape = {"dim": 1024, "n_heads": 16, "n_layers": args.layers, **shape}
        spec = ModelSpec(n_kv_heads=4, head_dim=64, vocab_size=4096, seq_len=64, weight_type="q40", **shape)
        m = build(spec)
        ids = np.random.default_rng(1).integers(0, spec.vocab_size, N)
        by_expert = timed(m, ids, args.repeat)
        hits = int(np.count_nonzero(np.diff(m.moe.offsets)))
        m._moe = rowwise_moe.__get__(m)
        by_row = timed(m, ids, args.repeat)
        print(f"{label:24s} by row {by_row[0]:7.1f} / {by_row[1]:7.1f}   by expert {by_expert[0]:7.1f} / "
              f"{by_expert[1]:7.1f}   CPU x{by_row[1] / by_expert[1]:.2f}   expert FFN calls per layer: "
              f"{N * spec.n_active_experts} -> {hits} (last layer)")


if __name__ == "__main__":
    main()
