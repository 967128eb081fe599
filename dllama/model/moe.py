"""Mixture-of-experts feed-forward, computed by expert rather than by row.

Each row of a batch picks its top-k experts from the router's logits (Mixtral, Qwen3-MoE and Grok-1 all
weight them by the softmax over the chosen k: equal to a softmax over every expert, top-k, renormalised).
The rows are then grouped by expert, so a prompt batch costs one batched matmul per expert that any row
chose, not n x k matmuls of one row each: for a 32-token prefill on 8 experts top-2, 8 calls of about 8
rows instead of 64 of one. Every node runs the same routing (the router is whole on every node) over its
rows of each expert; the collective then sums the nodes' partial outputs.

All scratch is allocated once per batch size (`MoeScratch`); the per-token path only fills it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dllama import kernels as K
from dllama.kernels.ops import expf


class MoeScratch:
    """Buffers for batches of up to `b` rows of `spec`."""

    def __init__(self, spec, b: int):
        e, k, f32 = spec.n_experts, spec.n_active_experts, np.float32
        self.router = np.zeros((b, e), f32)      # router logits per row
        self.x = np.zeros((b, spec.dim), f32)     # one expert's rows of the FFN input, gathered
        self.out = np.zeros((b, spec.dim), f32)   # that expert's output for them
        self.rows = np.zeros(b * k, np.int64)     # row ids grouped by expert (ascending within one)
        self.weights = np.zeros(b * k, f32)       # the routing weight of each (row, expert) slot
        self.offsets = np.zeros(e + 1, np.int64)  # expert e's slots: offsets[e]:offsets[e + 1]
        self.hit = np.zeros(e, np.int64)          # the experts some row chose, ascending
        self.top = np.zeros(k, np.int64)


@njit(nogil=True, cache=True, error_model="numpy")
def route(logits, k, top, rows, weights, offsets, hit):
    """logits (n, E) -> every row's top-k experts (ties: the lower index), weighted by the softmax over
    them, grouped by expert into rows/weights/offsets (see MoeScratch). Returns how many experts were hit."""
    n, n_exp = logits.shape
    offsets[:] = 0
    for i in range(n):
        _top_k(logits[i], k, top)
        for j in range(k):
            offsets[top[j] + 1] += 1
    n_hit = 0
    for e in range(n_exp):
        if offsets[e + 1] > 0:
            hit[n_hit] = e
            n_hit += 1
        offsets[e + 1] += offsets[e]
    # offsets[e] is now where expert e's slots start; it serves as e's cursor while they fill
    for i in range(n):
        row = logits[i]
        _top_k(row, k, top)
        m = row[top[0]]
        total = np.float32(0.0)
        for j in range(k):
            total += expf(row[top[j]] - m)
        inv = np.float32(1.0) / total
        for j in range(k):
            e = top[j]
            slot = offsets[e]
            rows[slot] = i
            weights[slot] = expf(row[e] - m) * inv
            offsets[e] = slot + 1
    # each cursor stopped at the end of its expert's slots, which is where the next one's start
    for e in range(n_exp, 0, -1):
        offsets[e] = offsets[e - 1]
    offsets[0] = 0
    return n_hit


@njit(inline="always", nogil=True, cache=True)
def _top_k(row, k, top):
    # k passes of a max search: k is small (2 to 8) and this keeps no sorted copy of the row
    for j in range(k):
        best = -1
        for e in range(row.shape[0]):
            taken = False
            for t in range(j):
                if top[t] == e:
                    taken = True
            if not taken and (best < 0 or row[e] > row[best]):
                best = e
        top[j] = best


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def router_logits(x, w, out):
    """out (n, E) = x (n, dim) @ w (E, dim).T for an f32 router. Not numpy's matmul: for a batch that
    calls multithreaded OpenBLAS, whose threads then spin on the cores the kernels need (measured: a
    32-token MoE layer of Qwen3-30B-A3B's shape 57 ms instead of 35)."""
    for i in range(x.shape[0]):
        xi = x[i]
        for e in range(w.shape[0]):
            we = w[e]
            acc = np.float32(0.0)
            for c in range(xi.shape[0]):
                acc += xi[c] * we[c]
            out[i, e] = acc


@njit(nogil=True, cache=True)
def gather(x, rows, out):
    """out[j] = x[rows[j]] for j < len(rows)."""
    for j in range(rows.shape[0]):
        out[j, :] = x[rows[j], :]


@njit(nogil=True, cache=True)
def scatter_add(y, rows, weights, src):
    """y[rows[j]] += weights[j] * src[j] for j < len(rows)."""
    for j in range(rows.shape[0]):
        w = weights[j]
        r = rows[j]
        for c in range(y.shape[1]):
            y[r, c] += w * src[j, c]


def moe_ffn(s: MoeScratch, moe_gate, experts, n_active: int, xb: np.ndarray, y: np.ndarray, ffn) -> None:
    """y (n, dim) = the routed experts' outputs for xb (n, dim), by expert. `ffn(expert, x, out)` runs one
    expert's FFN (this node's rows of it) on a batch."""
    n = xb.shape[0]
    router = s.router[:n]
    if moe_gate.qtype == "f32":
        router_logits(xb, moe_gate.w, router)
    else:
        K.matmul(moe_gate, xb, router)
    n_hit = route(router, n_active, s.top, s.rows, s.weights, s.offsets, s.hit)
    y[:] = 0
    for e in s.hit[:n_hit]:
        a, b = s.offsets[e], s.offsets[e + 1]
        rows = s.rows[a:b]
        out = s.out[:b - a]
        if b - a == n:          # every row chose e, in order: no copy of the input needed
            ffn(experts[e], xb, out)
        else:
            x = s.x[:b - a]
            gather(xb, rows, x)
            ffn(experts[e], x, out)
        scatter_add(y, rows, s.weights[a:b], out)
