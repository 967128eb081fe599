"""The partition plan: pure, checked without sockets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec
from dllama.model.partition import NodeSlice, max_nodes, partition, slice_tensor, valid_node_counts

SMOLLM2 = ModelSpec(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    vocab_size=49152, seq_len=8192)
LLAMA3_8B = ModelSpec(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                      vocab_size=128256, seq_len=8192)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_even_power_of_two_splits_keep_whole_kv_groups(n):
    plan = partition(LLAMA3_8B, n)
    for key, total in (("heads", 32), ("kv_heads", 8), ("ffn", 14336), ("vocab", 128256)):
        covered = [i for node in plan for i in getattr(node, key)]
        assert covered == list(range(total)), key
    for node in plan:   # a node's query heads are exactly the ones grouped on its KV heads
        assert node.heads == range(node.kv_heads.start * 4, node.kv_heads.stop * 4)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 9])
def test_smollm2_splits_unpadded_on_every_count_its_heads_allow(n):
    plan = partition(SMOLLM2, n)
    assert [i for node in plan for i in node.heads] == list(range(9))
    assert [i for node in plan for i in node.ffn] == list(range(1536))
    for node in plan:
        assert len(node.heads) >= 1 and len(node.ffn) >= 32
        assert {h // 3 for h in node.heads} == set(node.kv_heads)


def test_more_nodes_than_kv_heads_share_kv_heads():
    plan = partition(LLAMA3_8B, 16)
    assert [len(node.heads) for node in plan] == [2] * 16
    assert [node.kv_heads for node in plan[:4]] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]


def test_counts_past_the_heads_and_bad_weights_are_refused_naming_what_works():
    with pytest.raises(DllamaError, match=r"over 10 nodes \(it has 9 query heads.*node counts that work: 1 to 9$"):
        partition(SMOLLM2, 10)
    assert valid_node_counts(SMOLLM2) == list(range(1, 10))
    with pytest.raises(DllamaError, match=r"over 0 nodes"):
        partition(SMOLLM2, 0)
    with pytest.raises(DllamaError, match=r"2 split weights were given for 3 nodes"):
        partition(SMOLLM2, 3, [1, 2])
    for bad in (0, -1, float("nan"), float("inf"), "2", True, 10**400, None):
        with pytest.raises(DllamaError, match=r"split weight .* is not a positive number"):
            partition(SMOLLM2, 2, [1, bad])
    narrow = ModelSpec(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=10)
    with pytest.raises(DllamaError, match=r"4 query heads \(2 to a 32-value block\) and an FFN width of 96: at most 2"):
        partition(narrow, 3)
    # 16-value heads in 32-value blocks: a head unit is two heads
    assert [n.heads for n in partition(narrow, 2)] == [range(0, 2), range(2, 4)]


def test_weights_move_the_shares():
    fast, slow, slower = partition(SMOLLM2, 3, [3, 1, 1])
    assert (len(fast.heads), len(slow.heads), len(slower.heads)) == (5, 2, 2)
    assert len(fast.ffn) > 2.5 * len(slow.ffn)
    assert fast.weights == (3, 1, 1)


@st.composite
def _split(draw):
    align = 32
    hd = draw(st.sampled_from([16, 32, 64, 80, 128]))
    group, n_kv = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    spec = ModelSpec(dim=64, hidden_dim=32 * draw(st.integers(1, 64)), n_layers=1, n_heads=group * n_kv,
                     n_kv_heads=n_kv, head_dim=hd, vocab_size=draw(st.integers(1, 3000)),
                     weight_type=draw(st.sampled_from(["q40", "q80", "f32", "f16"])))
    n = draw(st.integers(1, max_nodes(spec)))
    weights = draw(st.lists(st.floats(0.05, 20), min_size=n, max_size=n) | st.lists(st.integers(1, 9), min_size=n,
                                                                                      max_size=n))
    return spec, weights, align


@settings(max_examples=300, deadline=None)
@given(_split())
def test_plan_properties(case):
    """Every row and column owned exactly once, column cuts on block boundaries, KV heads exactly those the
    query heads read, and each share within one unit of its weight's share wherever that share is a unit."""
    spec, weights, align = case
    plan = partition(spec, len(weights), weights)
    group, total_w = spec.n_heads // spec.n_kv_heads, sum(weights)
    hu = align // math.gcd(align, spec.head_dim)
    parts = (("heads", spec.n_heads, hu, spec.head_dim), ("ffn", spec.ffn_dim, align, 1),
             ("vocab", spec.vocab_size, 1, 1))
    for key, total, unit, width in parts:
        ranges = [getattr(node, key) for node in plan]
        assert [i for r in ranges for i in r] == list(range(total)), key
        assert all(len(r) > 0 for r in ranges)
        if key != "vocab":   # columns of wo / w2: no cut inside a block
            assert all(r.start * width % align == 0 for r in ranges)
        ideal = [total * w / total_w for w in weights]
        if min(ideal) >= unit:
            assert all(abs(len(r) - x) <= unit + 1e-9 for r, x in zip(ranges, ideal)), (key, ranges, ideal)
    assert set().union(*(set(node.kv_heads) for node in plan)) == set(range(spec.n_kv_heads))
    for node in plan:
        assert set(node.kv_heads) == {h // group for h in node.heads}
        assert NodeSlice.from_dict(node.to_dict()) == node


def test_slice_dict_round_trip():
    node = partition(LLAMA3_8B, 4)[2]
    assert NodeSlice.from_dict(node.to_dict()) == node


class _T:
    def __init__(self, qtype, shape, data):
        self.qtype, self.shape, self.data = qtype, shape, data


def test_row_and_column_slices_reassemble_the_matrix():
    spec = ModelSpec(dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=10, seq_len=8)
    w = np.arange(64 * 128, dtype=np.float32).reshape(128, 64)    # w1: (ffn, dim)
    w2 = np.ascontiguousarray(w.T)                                 # w2: (dim, ffn)
    t1 = _T("f32", w.shape, w.view(np.uint8).reshape(-1))
    t2 = _T("f32", w2.shape, w2.view(np.uint8).reshape(-1))
    plan = partition(spec, 2)
    rows = [slice_tensor(t1, "layers.0.w1", spec, node) for node in plan]
    cols = [slice_tensor(t2, "layers.0.w2", spec, node) for node in plan]
    assert rows[0][1] == (64, 64) and cols[1][1] == (64, 64)
    np.testing.assert_array_equal(
        np.concatenate([r[2].view(np.float32).reshape(r[1]) for r in rows]), w)
    np.testing.assert_array_equal(
        np.concatenate([c[2].view(np.float32).reshape(c[1]) for c in cols], axis=1), w2)
    assert slice_tensor(t1, "tok_embd", spec, plan[1]) is None
