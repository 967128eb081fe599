"""dllama.quants against the `gguf` package's own quantizers (byte for byte) and ggml's block sizes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dllama import quants
from dllama.errors import DllamaError

GGML = {"q40": T.Q4_0, "q41": T.Q4_1, "q80": T.Q8_0, "f16": T.F16, "f32": T.F32}


def awkward(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Rows of very different scales plus the blocks quantizers get wrong: zeros, constants, ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= rng.uniform(1e-4, 30, (rows, 1)).astype(np.float32)
    if rows >= 6 and cols >= 64:
        x[0, :32] = 0                                  # all-zero block: d = 0
        x[1, :32] = 1.5                                # constant positive block
        x[2, :32] = -2.0                               # constant negative block
        x[3, :32] = np.linspace(-127, 127, 32) / 2     # q80 half-way cases (x/d = k + 0.5)
        x[4, 32:64] = np.arange(32) - 16.0             # both extremes present, negative one larger
        x[5, :32] = -x[5, :32].max()                   # mixed sign, ties in magnitude
    return x


def ggml_bytes(qtype: str, x: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(x, GGML[qtype]).view(np.uint8).reshape(x.shape[0], -1)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80", "f16", "f32"])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 4096), (6, 64)])
def test_quantize_is_byte_identical_to_gguf(qtype, shape):
    x = awkward(*shape, seed=shape[0])
    ours = quants.quantize(qtype, x)
    assert ours.dtype == np.uint8 and ours.shape == (shape[0], quants.row_bytes(qtype, shape[1]))
    np.testing.assert_array_equal(ours, ggml_bytes(qtype, x))


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80", "f16", "f32"])
def test_dequantize_matches_gguf(qtype):
    x = awkward(9, 128, seed=3)
    raw = ggml_bytes(qtype, x)
    ours = quants.dequantize(qtype, raw, 9, 128)
    theirs = gguf.quants.dequantize(raw if qtype not in ("f16", "f32") else raw.view(
        np.float16 if qtype == "f16" else np.float32), GGML[qtype]).reshape(9, 128)
    np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 160])),
                  elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from(["q40", "q41", "q80"]))
def test_quantize_matches_gguf_on_any_values(x, qtype):
    ours, theirs = quants.quantize(qtype, x), ggml_bytes(qtype, x)
    # A block whose scale is so small (subnormal) that 1/d overflows has d = 0 in f16, so its nibbles
    # decode alike whatever they are; gguf casts NaN/inf to uint8 there (platform-defined), dllama writes
    # the nibble of 0. Such blocks must decode the same; every other block must match byte for byte.
    blocks = x.reshape(-1, 32)
    if qtype == "q40":
        d = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None], 1)[:, 0] / np.float32(-8)
    else:
        d = (blocks.max(1) - blocks.min(1)) / np.float32(15 if qtype == "q41" else 1)
        if qtype == "q80":
            d = np.abs(blocks).max(1) / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        tiny = (d != 0) & ~np.isfinite(np.float32(1) / d)
    per_block = quants.row_bytes(qtype, 32)
    ob, tb = ours.reshape(-1, per_block), theirs.reshape(-1, per_block)
    np.testing.assert_array_equal(ob[~tiny], tb[~tiny])
    rows, cols = x.shape
    np.testing.assert_array_equal(quants.dequantize(qtype, ours, rows, cols),
                                  quants.dequantize(qtype, theirs, rows, cols))


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
def test_block_sizes_are_ggmls(qtype):
    block, size = gguf.GGML_QUANT_SIZES[GGML[qtype]]
    assert (quants.BLOCK_SIZE, quants.BLOCK_BYTES[qtype]) == (block, size)
    assert quants.row_bytes(qtype, 4096) == 4096 // block * size


def test_round_trip_error_is_within_one_step():
    x = awkward(50, 256, seed=7)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    step = {"q40": amax / 8, "q41": (blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)) / 15,
            "q80": amax / 127}
    for qtype, d in step.items():
        err = np.abs(quants.dequantize(qtype, quants.quantize(qtype, x), 50, 256) - x).reshape(-1, 32)
        # one quantization step, plus the f16 rounding of the scale (and of the q41 minimum)
        assert np.all(err <= d * 1.01 + amax * 2e-3), qtype


def test_nibble_order_is_ggmls():
    # value j in the low nibble of byte j, value j+16 in the high nibble (docs/architecture.md)
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 16] = -8.0, 4.0           # d = 1 (largest magnitude -8 / -8)
    raw = quants.quantize_q40(x)[0]
    assert raw[:2].view(np.float16)[0] == 1.0
    assert raw[2] == (0 & 0xF) | ((4 + 8) << 4)
    assert all(b == 8 | (8 << 4) for b in raw[3:])


def test_bad_widths_and_sizes_raise():
    with pytest.raises(DllamaError, match="multiple of 32"):
        quants.quantize_q40(np.zeros((2, 48), np.float32))
    with pytest.raises(DllamaError, match="needs 36 bytes, got 35"):
        quants.dequantize("q40", np.zeros(35, np.uint8), 2, 32)
    with pytest.raises(DllamaError, match="unknown weight type"):
        quants.row_bytes("iq4", 32)
