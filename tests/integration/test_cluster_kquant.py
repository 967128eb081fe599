"""A K-quant GGUF (llama.cpp's Q4_K_M of a tiny Llama, tests/data) on 2 nodes over loopback: a real
`dllama worker` receives its Q4_K/Q6_K slices in WEIGHT frames and computes what the same split computes
on one node, within float rounding (F32 buffers)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster_fixtures import pool, worker_pool  # noqa: F401  (fixtures)
from test_cluster import Root
from testlib import DATA

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_q4_k_m_on_two_nodes_over_sockets(pool):
    path = DATA / "tiny_q4_k_m.gguf"
    prompt = [int(t) for t in np.load(DATA / "kquant_logits.npz")["prompt"][:12]]
    root = Root(path, [pool[0].address], "f32")
    try:
        ids, logits = root.greedy(prompt=prompt)
    finally:
        root.close()
    root1 = Root(path, [])
    try:
        _, logits1 = root1.greedy(prompt=prompt, force=ids)
    finally:
        root1.close()
    np.testing.assert_allclose(logits, logits1, rtol=0, atol=1e-3 * np.abs(logits1).max())
    assert {"q4k", "q6k"} <= {t.qtype for t in root.loaded.tensors.values()}
