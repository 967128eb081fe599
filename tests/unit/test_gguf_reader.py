"""Our fast GGUF header reader against the `gguf` package's own reader and writer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from dllama.errors import FormatError
from dllama.formats.gguf_reader import GGUFFile


def _same(path):
    ref, ours = gguf.GGUFReader(path), GGUFFile(path)
    assert set(ref.fields) == set(ours.fields)
    for k, f in ref.fields.items():
        a, b = f.contents(), ours.fields[k].contents()
        if isinstance(a, float):
            assert b == pytest.approx(a), k
        else:
            assert a == b, k
    assert [t.name for t in ref.tensors] == [t.name for t in ours.tensors]
    for x, y in zip(ref.tensors, ours.tensors):
        assert x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape) and x.n_bytes == y.n_bytes
        np.testing.assert_array_equal(x.data.view(np.uint8).reshape(-1), y.data)


def test_agrees_with_gguf_reader_on_every_value_type(tmp_path):
    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("a.u8", 7)
    w.add_int32("a.i32", -5)
    w.add_float32("a.f32", 0.25)
    w.add_bool("a.bool", True)
    w.add_uint64("a.u64", 2**40)
    w.add_float64("a.f64", 1.5)
    w.add_string("a.str", "héllo")
    w.add_array("a.strs", ["x", "", "ü✓"])
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.floats", [0.5, -1.0])
    w.add_tensor("m", np.arange(64, dtype=np.float32).reshape(2, 32))
    q = gguf.quants.quantize(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("q", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same(path)


def test_agrees_with_gguf_reader_on_the_default_model(smollm2_path):
    _same(smollm2_path)


def test_truncated_file_is_named(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(FormatError, match="cut.gguf.*truncated"):
        GGUFFile(str(cut))
