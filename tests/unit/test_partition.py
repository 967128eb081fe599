"""The partition plan: pure, checked without sockets."""

from __future__ import annotations

import numpy as np
import pytest

from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec
from dllama.model.partition import NodeSlice, partition, slice_tensor, valid_node_counts

SMOLLM2 = ModelSpec(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    vocab_size=49152, seq_len=8192)
LLAMA3_8B = ModelSpec(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                      vocab_size=128256, seq_len=8192)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ranges_cover_everything_once(n):
    plan = partition(LLAMA3_8B, n)
    for key, total in (("heads", 32), ("kv_heads", 8), ("ffn", 14336), ("vocab", 128256)):
        covered = [i for node in plan for i in getattr(node, key)]
        assert covered == list(range(total)), key
    for node in plan:   # a node's query heads are exactly the ones grouped on its KV heads
        assert node.heads == range(node.kv_heads.start * 4, node.kv_heads.stop * 4)


def test_counts_the_reference_rejects_are_refused_naming_what_works():
    with pytest.raises(DllamaError, match=r"node counts that work: 1, 2, 4, 8"):
        partition(LLAMA3_8B, 3)
    with pytest.raises(DllamaError, match=r"16 nodes.*8 KV heads"):
        partition(LLAMA3_8B, 16)
    with pytest.raises(DllamaError, match=r"over 2 nodes \(it has 3 KV heads\); node counts that work: 1$"):
        partition(SMOLLM2, 2)
    assert valid_node_counts(SMOLLM2) == [1]
    with pytest.raises(DllamaError, match=r"over 3 nodes \(the node count must be a power of two\)"):
        partition(LLAMA3_8B, 3)
    narrow = ModelSpec(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=10)
    with pytest.raises(DllamaError, match=r"FFN width 96 does not split.*over 2 nodes\); node counts that work: 1$"):
        partition(narrow, 2)


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
