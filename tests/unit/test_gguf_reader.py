"""Our fast GGUF header reader against the `gguf` package's own reader and writer."""

from __future__ import annotations

import struct

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


# --- hostile headers: each fails at once with one FormatError naming the file and what is wrong ----------

ARRAY, STRING, UINT8, UINT32 = 9, 8, 0, 4


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _gguf(path, kvs: list[bytes], tensors: list[bytes] = (), n_tensors=None, n_kv=None, pad: int = 0) -> str:
    """A GGUF v3 file written byte by byte (the `gguf` writer refuses to write what these tests need)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv)
    with open(path, "wb") as f:
        f.write(head + b"".join(kvs) + b"".join(tensors))
        if pad:
            f.truncate(f.tell() + pad)   # sparse: zeros that take no disk space
    return str(path)


def _f32_tensor(name: str, *dims: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", 0, 0)


@pytest.mark.parametrize("depth, ok", [(2, True), (5, False), (100_000, False)])
def test_nested_arrays_are_bounded(tmp_path, depth, ok):
    value = struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", UINT8, 1) + b"\x07"
    path = _gguf(tmp_path / "deep.gguf", [_s("deep") + value])
    if ok:
        assert GGUFFile(path).fields["deep"].value[0].tolist() == [7]
        assert gguf.GGUFReader(path).fields["deep"] is not None   # the format allows it
    else:
        with pytest.raises(FormatError, match="deep.gguf.*nested more than 4 deep"):
            GGUFFile(path)


@pytest.mark.parametrize("align", [0, 48, 1 << 30])
def test_alignment_must_be_a_sane_power_of_two(tmp_path, align):
    kv = _s("general.alignment") + struct.pack("<II", UINT32, align)
    path = _gguf(tmp_path / "align.gguf", [kv], [_f32_tensor("t", 32)], pad=4096)
    with pytest.raises(FormatError, match=f"align.gguf.*general.alignment {align} is not a power of two"):
        GGUFFile(path)


def test_a_power_of_two_alignment_is_read(tmp_path):
    kv = _s("general.alignment") + struct.pack("<II", UINT32, 64)
    path = _gguf(tmp_path / "a64.gguf", [kv], [_f32_tensor("t", 32)], pad=4096)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.tensors[0].data_offset == ref.tensors[0].data_offset


def test_ten_million_empty_strings_are_refused_before_reading_them(tmp_path):
    n = 10 ** 7
    kv = _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, n)
    path = _gguf(tmp_path / "many.gguf", [kv], pad=8 * n)   # every one of them is there (8 zero bytes each)
    with pytest.raises(FormatError, match=f"many.gguf.*{n} strings"):
        GGUFFile(path)


@pytest.mark.parametrize("field, declared", [("n_kv", 1 << 40), ("n_tensors", 1 << 60)])
def test_counts_past_the_file_size_are_refused(tmp_path, field, declared):
    path = _gguf(tmp_path / "count.gguf", [], **{field: declared}, pad=1024)
    with pytest.raises(FormatError, match=f"count.gguf.*declares {declared} .*bytes left"):
        GGUFFile(path)


def test_array_longer_than_the_file_is_refused(tmp_path):
    kv = _s("scores") + struct.pack("<IIQ", ARRAY, UINT32, 1 << 50)
    with pytest.raises(FormatError, match="declares 1125899906842624 array elements"):
        GGUFFile(_gguf(tmp_path / "long.gguf", [kv], pad=64))


@pytest.mark.parametrize("dims", [(1 << 40, 1 << 40), (2,) * 5])
def test_tensor_shapes_past_the_file_are_refused(tmp_path, dims):
    path = _gguf(tmp_path / "shape.gguf", [], [_f32_tensor("t", *dims)], pad=4096)
    with pytest.raises(FormatError, match="shape.gguf.*(past the end|dimensions)"):
        GGUFFile(path)
