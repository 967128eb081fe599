"""Q80 network buffers: the same bytes as dllama.quants' Q80 and the `gguf` package's Q8_0."""

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from dllama import quants
from dllama.net.codec import Q80Codec

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _rows():
    rng = np.random.default_rng(1)
    x = rng.normal(scale=3, size=(6, 96)).astype(np.float32)
    x[1, :32] = 0                       # an all-zero block
    x[2, :32] = np.arange(32) - 15.5    # values landing on .5 after scaling: half away from zero, not to even
    # The largest float32 below 0.5, in a block whose scale is exactly 1 (max 127): x / d is 0.49999997,
    # which C roundf takes to 0 and `+ 0.5, floor` to 1 (0.49999997 + 0.5 rounds to 1.0 in float32).
    x[3, :32] = 0
    x[3, 0] = 127
    x[3, 1:4] = [np.nextafter(np.float32(0.5), np.float32(0)), -np.nextafter(np.float32(0.5), np.float32(0)), 2.5]
    x[4, 32:64] = np.float32(1e-30)     # tiny values: the scale underflows to f16 zero
    return x


def _strided(x):
    """The same rows as a view into a wider array (as a slice of a batch is)."""
    wide = np.zeros((x.shape[0], x.shape[1] + 32), np.float32)
    wide[:, :x.shape[1]] = x
    return wide[:, :x.shape[1]]


STRIDED = pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])


@STRIDED
def test_0_49999997_rounds_to_0_as_c_roundf_does(strided):
    x = _strided(_rows()) if strided else _rows()
    assert np.float32(x[3, 1]) == np.float32(0.49999997)
    codec = Q80Codec(8, 96)
    out = np.empty(codec.nbytes(8), np.uint8)
    got = np.frombuffer(codec.encode(x, out), np.uint8).reshape(6, 3, 34)
    assert got[3, 0, 0:2].view(np.float16)[0] == 1.0
    assert got[3, 0, 2:6].view(np.int8).tolist() == [127, 0, 0, 3]


@STRIDED
def test_q80_buffers_are_the_bytes_of_dllama_quants_and_gguf(strided):
    x = _strided(_rows()) if strided else _rows()
    codec = Q80Codec(8, 96)
    out = np.empty(codec.nbytes(8), np.uint8)
    got = np.frombuffer(codec.encode(x, out), np.uint8)
    assert got.size == codec.nbytes(6)
    assert np.array_equal(got, quants.quantize("q80", x).reshape(-1))
    ref = quantize(np.ascontiguousarray(x), Q8_0).reshape(-1)
    assert np.array_equal(got, ref)
    y = _strided(np.empty_like(x)) if strided else np.empty_like(x)
    codec.decode(out, y)
    assert np.array_equal(y, dequantize(ref.reshape(6, -1), Q8_0))
    acc = np.ones_like(y)
    codec.decode_add(out, acc)
    assert np.array_equal(acc, y + 1)


@STRIDED
def test_encode_keep_leaves_what_a_receiver_decodes(strided):
    """A sender that goes on with its own buffer (an all-reduce's partial, the root's broadcast x) gets the
    values gguf's Q8_0 round trip gives, in the same pass that wrote the same bytes as a plain encode."""
    x = _rows()
    kept = _strided(x) if strided else x.copy()
    codec = Q80Codec(6, 96)
    plain, fused = np.empty(codec.nbytes(6), np.uint8), np.empty(codec.nbytes(6), np.uint8)
    codec.encode(x, plain)
    codec.encode(kept, fused, keep=True)
    assert np.array_equal(fused, plain)
    want = dequantize(quantize(x, Q8_0), Q8_0).reshape(x.shape)
    assert np.array_equal(np.asarray(kept), want)
    back = np.empty_like(x)
    codec.decode(fused, back)
    assert np.array_equal(back, np.asarray(kept))
