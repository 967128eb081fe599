"""Sampling from the output layer's top candidates, without gathering every node's logits.

Each node holds a slice of the vocabulary. Instead of its slice of logits (128k floats for Llama 3), a node
sends its `k` best tokens (logit descending, id ascending) and its slice's partial softmax normaliser at
temperature T: m = max(l) / T and s = sum(exp(l / T - m)), in float64. The root merges them:
M = max(m_i), S = sum_i s_i * exp(m_i - M) (in node order), and the probability of a candidate is
exp(l / T - M) / S, the same formula the full sampler evaluates over the whole vocabulary.

Every token a node did not send has a logit at most its k-th best one (`floor`, the highest such over the
nodes that cut their list short), so the candidates decide a token exactly when the choice depends on
tokens above the floor only:
- greedy: always (the best token of the vocabulary is the best of some node's list);
- top-p: when the nucleus (tokens by probability, descending, until the cumulative mass reaches top_p) is
  reached within the candidates and its last token is more probable than any token at the floor.
Otherwise the root asks the workers for their full slices (one more round trip) and samples as before.
The decision is the full sampler's, step by step; only S is summed in another order, which moves a
probability by about one part in 1e16.
"""

from __future__ import annotations

import numpy as np
from numba import njit

TOP_K = 64   # candidates per node: 512 bytes on the wire, against 4 bytes per vocabulary entry


@njit(inline="always", nogil=True, cache=True)
def _worse(vals, ids, a, b):
    # entry a ranks below entry b: a lower logit, or the same logit and a higher id
    return vals[a] < vals[b] or (vals[a] == vals[b] and ids[a] > ids[b])


@njit(inline="always", nogil=True, cache=True)
def _swap(vals, ids, a, b):
    vals[a], vals[b] = vals[b], vals[a]
    ids[a], ids[b] = ids[b], ids[a]


@njit(nogil=True, cache=True)
def top_k(logits, k, ids, vals):
    """The k best of logits (f32, 1-D) into ids/vals (at least k long), best first: logit descending, then
    index ascending (np.argmax's tie rule). Returns how many (min(k, size)). A heap of the k kept whose
    root is the worst of them: one compare per logit once it is full."""
    n = min(k, logits.size)
    for i in range(n):
        ids[i] = i
        vals[i] = logits[i]
        j = i
        while j > 0 and _worse(vals, ids, j, (j - 1) // 2):
            _swap(vals, ids, j, (j - 1) // 2)
            j = (j - 1) // 2
    for i in range(n, logits.size):
        if logits[i] <= vals[0]:   # an equal logit with a higher id never beats what is kept
            continue
        vals[0] = logits[i]
        ids[0] = i
        j = 0
        while 2 * j + 1 < n:
            c = 2 * j + 1
            if c + 1 < n and _worse(vals, ids, c + 1, c):
                c += 1
            if not _worse(vals, ids, c, j):
                break
            _swap(vals, ids, j, c)
            j = c
    # best first: insertion sort of the k kept (k is small)
    for i in range(1, n):
        j = i
        while j > 0 and _worse(vals, ids, j - 1, j):
            _swap(vals, ids, j - 1, j)
            j -= 1
    return n


def normaliser(logits: np.ndarray, temperature: float, scratch: np.ndarray) -> tuple[float, float]:
    """(m, s) of a slice of logits (f32, 1-D): m = max / T, s = sum(exp(l / T - m)), float64 as the full
    sampler computes them. `scratch` is float64 of the slice's size (no allocation per token)."""
    z = scratch[:logits.size]
    np.divide(logits, temperature, out=z, dtype=np.float64)
    m = float(z.max())
    np.subtract(z, m, out=z)
    np.exp(z, out=z)
    return m, float(z.sum())


def node_candidates(logits: np.ndarray, start: int, k: int, temperature: float, ids: np.ndarray,
                    vals: np.ndarray, scratch: np.ndarray) -> tuple[int, float, float]:
    """A node's share of a top step: its best k of `logits` (its vocabulary slice, 1-D f32, the first
    token being `start`) into ids (global, int32) and vals, and its normaliser (0, 0 when greedy).
    Returns (how many, m, s)."""
    if k == 1 and logits.size:   # greedy: numpy's vectorised argmax has the same tie rule (first index)
        best = int(np.argmax(logits))
        ids[0], vals[0], n = start + best, logits[best], 1
    else:
        n = top_k(logits, k, ids, vals)
        ids[:n] += start
    m, s = normaliser(logits, temperature, scratch) if temperature > 0 else (0.0, 0.0)
    return n, m, s


class Candidates:
    """What the root samples from instead of the full logits: every node's top candidates and normaliser.

    ids/logits: the candidates of all nodes, concatenated (global token ids; f32 logits). m/s: each node's
    normaliser (node order). floor: every token not among the candidates has a logit <= floor (-inf when
    every node sent its whole slice). `full()` gathers the full logits (the fall-back)."""

    def __init__(self, ids, logits, m, s, floor: float, temperature: float, vocab_size: int, full):
        self.ids, self.logits, self.m, self.s = ids, logits, m, s
        self.floor, self.temperature, self.vocab_size = floor, temperature, vocab_size
        self.full = full

    def greedy(self) -> int:
        """The vocabulary's argmax (lowest id among equal best logits)."""
        best = self.logits.max()
        return int(self.ids[self.logits == best].min())

    def nucleus(self, topp: float):
        """(token ids, their probabilities) of the top-p nucleus in the full sampler's order, or None when
        the candidates do not decide it."""
        z = self.logits.astype(np.float64) / self.temperature
        big_m = max(self.m)
        total = 0.0
        for m, s in zip(self.m, self.s):
            total += s * np.exp(m - big_m)
        p = np.exp(z - big_m) / total
        keep = p >= (1 - topp) / (self.vocab_size - 1)   # the full sampler's pre-filter
        ids, p = self.ids[keep], p[keep]
        order = np.lexsort((ids, -p))
        cum = np.cumsum(p[order])
        last = int(np.searchsorted(cum, topp)) + 1
        if last > order.size:
            return None   # the candidates do not reach top_p
        p_floor = np.exp(np.float64(self.floor) / self.temperature - big_m) / total
        if not p[order[last - 1]] > p_floor:
            return None   # a token that was not sent could be as probable as the nucleus's last one
        return ids[order[:last]], p[order[:last]]
