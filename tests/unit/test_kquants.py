"""The GGUF types dllama only reads (dllama.kquants) against the `gguf` package's dequantizers, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from dllama import quants
from dllama.errors import DllamaError
from naive import random_blocks  # tests/naive.py: tests/ is on sys.path (pytest rootdir conftest)

READ_ONLY = [q for q in quants.QTYPES if quants.QUANTS[q].read_only]
def test_registry_names_every_gguf_type_with_ggml_sizes():
    for name in READ_ONLY:
        q = quants.QUANTS[name]
        assert (q.block_size, q.type_size) == gguf.GGML_QUANT_SIZES[q.gguf]
        assert q.dlm_code is None
    assert len({q.wire_code for q in quants.QUANTS.values()}) == len(quants.QUANTS)


@pytest.mark.parametrize("qtype", READ_ONLY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_is_bit_identical_to_gguf(qtype, seed):
    q = quants.QUANTS[qtype]
    raw = random_blocks(qtype, 37, seed)
    ours = quants.dequantize(qtype, raw, 37, q.block_size)
    theirs = np.asarray(gguf.quants.dequantize(raw, q.gguf), np.float32).reshape(37, q.block_size)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", ["q4k", "q6k", "q51"])
def test_dequantize_of_several_blocks_per_row(qtype):
    q = quants.QUANTS[qtype]
    raw = random_blocks(qtype, 12, 5)
    ours = quants.dequantize(qtype, raw.reshape(3, -1), 3, 4 * q.block_size)
    theirs = gguf.quants.dequantize(raw.reshape(3, -1), q.gguf)
    np.testing.assert_array_equal(ours, theirs)


def test_read_only_types_refuse_what_they_cannot_do():
    with pytest.raises(DllamaError, match="multiple of 256"):
        quants.row_bytes("q4k", 128)
    with pytest.raises(DllamaError, match="cannot quantize to 'q4k'"):
        quants.quantize("q4k", np.zeros((1, 256), np.float32))
