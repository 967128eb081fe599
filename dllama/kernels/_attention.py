"""Causal multi-head attention over a float32 KV cache, grouped-query heads supported.

    q (n, n_heads * hd); k_cache, v_cache (rows, n_kv_heads * hd); positions, bases (n,)
    query row t attends to cache rows bases[t]..bases[t] + positions[t] (so a prompt batch, whose keys are
    already written into the cache, is causal within itself, and rows of several sequences, each with its
    own stretch of the cache, share one call); query head h reads KV head
    (first + h) // group, where `group` is the model's query heads per KV head and `first` is where
    the node's first query head sits in its first KV head's group (a node of an uneven split may start
    or end inside a group; by default group = n_heads // n_kv_heads, first = 0);
    att (n_heads, >= max(positions) + 1) is scratch; out (n, n_heads * hd).
    A score is q.k * scale (scale 0: 1 / sqrt(hd)); with softcap c > 0 it becomes c * tanh(score / c),
    Grok-1's soft cap, as llama.cpp's `grok` graph computes it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dllama.kernels import _threads
from dllama.kernels.ops import expf, zero_bases


def _attention(q, k_cache, v_cache, positions, bases, n_heads, group, first, head_dim, att, out, scale, softcap):
    n = q.shape[0]
    rows = min(k_cache.shape[0], v_cache.shape[0])
    for t in range(n):
        if (positions[t] < 0 or positions[t] >= att.shape[1] or bases[t] < 0
                or bases[t] + positions[t] >= rows):
            raise ValueError("attention: a position is outside the KV cache or the att scratch")
    scale = np.float32(scale if scale > 0 else 1.0 / math.sqrt(head_dim))
    cap = np.float32(softcap)
    inv_cap = np.float32(1.0 / softcap if softcap > 0 else 0.0)
    for h in prange(n_heads):
        kvo = ((first + h) // group) * head_dim
        scores = att[h]
        for t in range(n):
            # 1-D views with plain range indices: no negative-index fix-ups, so the loops vectorise
            qh = q[t, h * head_dim:(h + 1) * head_dim]
            end = positions[t] + 1
            b = bases[t]
            m = np.float32(-np.inf)
            # keys four at a time: each query value loaded once for four dot products
            s = 0
            while s + 4 <= end:
                k0, k1 = k_cache[b + s, kvo:kvo + head_dim], k_cache[b + s + 1, kvo:kvo + head_dim]
                k2, k3 = k_cache[b + s + 2, kvo:kvo + head_dim], k_cache[b + s + 3, kvo:kvo + head_dim]
                d0 = d1 = d2 = d3 = np.float32(0.0)
                for d in range(head_dim):
                    qd = qh[d]
                    d0 += qd * k0[d]
                    d1 += qd * k1[d]
                    d2 += qd * k2[d]
                    d3 += qd * k3[d]
                d0, d1, d2, d3 = d0 * scale, d1 * scale, d2 * scale, d3 * scale
                if cap > 0:
                    d0 = cap * np.float32(math.tanh(d0 * inv_cap))
                    d1 = cap * np.float32(math.tanh(d1 * inv_cap))
                    d2 = cap * np.float32(math.tanh(d2 * inv_cap))
                    d3 = cap * np.float32(math.tanh(d3 * inv_cap))
                scores[s], scores[s + 1], scores[s + 2], scores[s + 3] = d0, d1, d2, d3
                m = max(m, d0, d1, d2, d3)
                s += 4
            for s in range(s, end):
                kh = k_cache[b + s, kvo:kvo + head_dim]
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += qh[d] * kh[d]
                dot *= scale
                if cap > 0:
                    dot = cap * np.float32(math.tanh(dot * inv_cap))
                scores[s] = dot
                m = max(m, dot)
            total = np.float32(0.0)
            for s in range(end):
                e = expf(scores[s] - m)
                scores[s] = e
                total += e
            # accumulated straight into this head's slice of out: no scratch per head and call; values four
            # rows at a time, so that each load and store of the output serves four of them
            oh = out[t, h * head_dim:(h + 1) * head_dim]
            oh[:] = 0.0
            s = 0
            while s + 4 <= end:
                a0, a1, a2, a3 = scores[s], scores[s + 1], scores[s + 2], scores[s + 3]
                v0, v1 = v_cache[b + s, kvo:kvo + head_dim], v_cache[b + s + 1, kvo:kvo + head_dim]
                v2, v3 = v_cache[b + s + 2, kvo:kvo + head_dim], v_cache[b + s + 3, kvo:kvo + head_dim]
                for d in range(head_dim):
                    oh[d] += (a0 * v0[d] + a1 * v1[d]) + (a2 * v2[d] + a3 * v3[d])
                s += 4
            for s in range(s, end):
                a = scores[s]
                vh = v_cache[b + s, kvo:kvo + head_dim]
                for d in range(head_dim):
                    oh[d] += a * vh[d]
            inv = np.float32(1.0) / total
            for d in range(head_dim):
                oh[d] *= inv


# reassoc lets the q.k dot product use vector lanes (a float sum is otherwise strictly ordered);
# tests hold the result to 1e-5 of float64. One compiled variant, the parallel one, at every thread count:
# reassociated sums are free to take another order in each compilation, and a serial twin did (Sapphire
# Rapids AVX-512 build: last bits apart), which the 8-bit activations of the next matmuls turned into a
# 0.13 -> 0.45 mean logit change on SmolLM2 between --nthreads 1 and 2. Each head runs whole on one
# thread, so the result is the same at any count; at one thread the parallel launch costs ~1.6 us a call.
_FLAGS = dict(nogil=True, cache=True, fastmath={"reassoc", "contract"})
_KERNEL = njit(parallel=True, **_FLAGS)(_attention)


def attention(q, k_cache, v_cache, positions, n_heads, n_kv_heads, head_dim, att, out, bases=None, group=None,
              first=0, scale=0.0, softcap=0.0):
    """Attention of every query row over the cache (see the module docstring); heads in parallel on
    set_threads' threads, the same result at any count. `bases` None: every row's sequence starts at cache
    row 0. Raises ValueError on shapes that do not fit."""
    if group is None:
        group = n_heads // n_kv_heads if n_heads % n_kv_heads == 0 else 0
    if (group < 1 or not 0 <= first < group or n_kv_heads != -(-(first + n_heads) // group)
            or q.shape[1] != n_heads * head_dim or k_cache.shape[1] != n_kv_heads * head_dim):
        raise ValueError(f"attention: {n_heads} heads / {n_kv_heads} KV heads of {head_dim} do not fit "
                         f"q {q.shape}, cache {k_cache.shape}")
    if att.shape[0] < n_heads or out.shape != q.shape:
        raise ValueError(f"attention: att {att.shape} or out {out.shape} too small")
    if bases is None:
        bases = zero_bases(q.shape[0])
    _threads.apply()
    _KERNEL(q, k_cache, v_cache, positions, bases, n_heads, group, first, head_dim, att, out, float(scale),
            float(softcap))
