"""Matmul on the GGUF types dllama only reads (dllama.kernels._kquant) against float64 twins built on the
`gguf` package's dequantizers, on awkward shapes: rows not a multiple of the tile, odd super-block counts,
batches of 1, 3, 32 (the 4-row groups and their remainder), serial and parallel."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

import dllama.kernels as K
from dllama import quants
from dllama.errors import DllamaError
import naive  # tests/naive.py: tests/ is on sys.path (pytest rootdir conftest)
from test_kernels import threads  # noqa: F401  (fixture: the serial and the parallel variants)

READ_ONLY = [q for q in quants.QTYPES if quants.QUANTS[q].read_only]


def weights(qtype, rows, cols, seed):
    """Raw bytes (read-only) of random blocks with scales of one moderate magnitude per row."""
    q = quants.QUANTS[qtype]
    n = rows * cols // q.block_size
    raw = naive.random_blocks(qtype, n, seed)
    rng = np.random.default_rng(seed)
    if qtype == "bf16":   # random bytes span 2**-127..2 within a row: weights do not
        raw = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    for off in naive.HALVES[qtype]:
        scale = np.repeat(rng.uniform(1e-3, 1e-1, rows), n // rows) * rng.choice([-1, 1], n)
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n, 2)
    raw = raw.reshape(-1)
    raw.flags.writeable = False
    return raw


def gguf_f64(qtype, raw, rows, cols):
    return np.asarray(gguf_dequantize(raw.reshape(rows, -1), quants.QUANTS[qtype].gguf), np.float64)


def activations(n, cols, seed=7):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, cols)).astype(np.float32) * rng.uniform(0.1, 10, (n, 1)).astype(np.float32)


KERNEL_TYPES = ["q4k", "q5k", "q6k"]


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("rows,cols", [(77, 256), (130, 768), (1, 512), (128, 256)])
def test_kquant_matmul_matches_twin(qtype, rows, cols, threads):
    raw = weights(qtype, rows, cols, rows + cols)
    W = K.pack(qtype, raw, rows, cols)
    assert (W.rows, W.cols, W.qtype) == (rows, cols, qtype)
    w = gguf_f64(qtype, raw, rows, cols)
    # the scale of the two terms Q4_K and Q5_K sum apart (d*sc*q and dmin*m): their rounding is what differs
    mins = np.zeros_like(w)
    if qtype != "q6k":
        no_d = raw.reshape(-1, quants.QUANTS[qtype].type_size).copy()
        no_d[:, 0:2] = 0
        mins = np.abs(gguf_f64(qtype, no_d, rows, cols))
    for n in (1, 32, 3, 6):
        x = activations(n, cols, seed=n)
        out = np.full((n, rows), np.nan, np.float32)
        K.matmul(W, x, out)
        ref = naive.quantize_act(x) @ w.T
        scale = np.abs(x).astype(np.float64) @ (np.abs(w) + 2 * mins).T
        assert np.all(np.abs(out - ref) <= 2e-6 * scale), n


@pytest.mark.parametrize("qtype", [q for q in READ_ONLY if q not in KERNEL_TYPES])
def test_requantized_types_match_their_weights(qtype, threads):
    # no kernel of their own: re-quantized to Q80 at load, so within Q80 rounding of the exact product
    q = quants.QUANTS[qtype]
    rows, cols = 70, 2 * max(q.block_size, 32)
    raw = weights(qtype, rows, cols, 3)
    W = K.pack(qtype, raw, rows, cols)
    assert W.qtype == "q80" and W.rows == rows
    w = gguf_f64(qtype, raw, rows, cols)
    for n in (1, 5):
        x = activations(n, cols)
        out = np.empty((n, rows), np.float32)
        K.matmul(W, x, out)
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T
        assert np.all(np.abs(out - x.astype(np.float64) @ w.T) <= 0.02 * scale), n


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_fused_rows_equal_separate(qtype):
    a, b = weights(qtype, 64, 512, 1), weights(qtype, 30, 512, 2)
    x = activations(2, 512)
    fused = K.pack(qtype, np.concatenate([a, b]), 94, 512)
    out = np.empty((2, 94), np.float32)
    K.matmul(fused, x, out)
    for raw, rows, sl in ((a, 64, slice(0, 64)), (b, 30, slice(64, 94))):
        part = np.empty((2, rows), np.float32)
        K.matmul(K.pack(qtype, raw, rows, 512), x, part)
        np.testing.assert_array_equal(out[:, sl], part)


def test_pack_rejects_bad_kquant_input():
    with pytest.raises(DllamaError, match="multiple of 256"):
        K.pack("q4k", np.zeros(144, np.uint8), 1, 128)
    with pytest.raises(DllamaError, match="needs 288 bytes"):
        K.pack("q4k", np.zeros(144, np.uint8), 2, 256)


def test_warmup_compiles_kquant_types():
    K.warmup(("q4k", "q5k", "q6k", "q2k"))


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("flavour", [("avx2", 32), ("generic", 16)], ids=["avx2", "portable"])
def test_other_multiply_add_flavours(qtype, flavour):
    # this CPU runs one flavour (see _simd.simd_isa); AVX2 and the portable sums (ARM without dotprod runs
    # them) are checked here too, serially (the parallel variant is the same body)
    from dllama.kernels import _kquant

    rows, cols = 70, 512
    raw = weights(qtype, rows, cols, 9)
    W = K.pack(qtype, raw, rows, cols)
    serial = _kquant.kernels_for(qtype, *flavour)[0]
    W.kernels = ((serial, serial), (serial, serial))
    w = gguf_f64(qtype, raw, rows, cols)
    for n in (1, 5):
        x = activations(n, cols, seed=n)
        out = np.empty((n, rows), np.float32)
        K.set_threads(1)
        K.matmul(W, x, out)
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T
        assert np.all(np.abs(out - naive.quantize_act(x) @ w.T) <= 1e-4 * scale), n


@pytest.mark.parametrize("qtype,quant_bytes", [("q5k", slice(16, 176)), ("q6k", slice(0, 192))])
@pytest.mark.parametrize("flavour", [None, ("avx2", 32)], ids=["host", "avx2"])
def test_largest_quants_do_not_overflow_the_sums(qtype, quant_bytes, flavour):
    # every quant at its largest (31, 63) against activations at +-127: the largest 16-bit pair sums the AVX2
    # multiply-adds form before they widen; one more product in a lane would saturate it
    from dllama.kernels import _kquant

    rows, cols = 70, 512
    raw = weights(qtype, rows, cols, 5).reshape(rows * cols // 256, -1).copy()
    raw[:, quant_bytes] = 0xFF
    raw = raw.reshape(-1)
    W = K.pack(qtype, raw, rows, cols)
    if flavour:
        serial = _kquant.kernels_for(qtype, *flavour)[0]
        W.kernels = ((serial, serial), (serial, serial))
        K.set_threads(1)
    w = gguf_f64(qtype, raw, rows, cols)
    x = np.ones((5, cols), np.float32)
    x[1::2] = -1
    out = np.empty((5, rows), np.float32)
    K.matmul(W, x, out)
    assert np.all(np.abs(out - naive.quantize_act(x) @ w.T) <= 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(w).T))


def _flavours():
    """Every multiply-add flavour this host runs: test_kernels_simd's, and AVX2 on 512-bit vectors and VNNI on
    256-bit ones where the host has them (simd_isa gives them to AVX-512 CPUs without VNNI, and to AVX-VNNI)."""
    from test_kernels_simd import _flavours as simd_flavours, _host_flags

    flags = _host_flags()
    extra = {("avx2", 64): "+avx512bw" in flags, ("vnni", 32): "+avxvnni" in flags}
    return sorted(set(simd_flavours()) | {f for f, ok in extra.items() if ok})


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_kquant_flavours_give_identical_bits(qtype):
    # the tile for 1, 2, 3 and 4 activation rows (7: a group of 4 and one of 3) and a partial last tile, on
    # every flavour: the integer sums are exact and the float part one order of operations, so the bits agree
    from dllama.kernels import _kquant

    rows, cols = 77, 512
    raw = weights(qtype, rows, cols, 13)
    w = gguf_f64(qtype, raw, rows, cols)
    K.set_threads(1)
    for n in (1, 2, 3, 4, 7):
        x = activations(n, cols, seed=n)
        x[0, :32] = np.linspace(-1, 1, 32)   # activations quantized to +-127
        outs = []
        for flavour in _flavours():
            W = K.pack(qtype, raw, rows, cols)
            serial = _kquant.kernels_for(qtype, *flavour)[0]
            W.kernels = ((serial, serial), (serial, serial))
            outs.append(np.full((n, rows), np.nan, np.float32))
            K.matmul(W, x, outs[-1])
        for out, flavour in zip(outs[1:], _flavours()[1:]):
            np.testing.assert_array_equal(out, outs[0], err_msg=f"{flavour}, {n} rows")
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T
        assert np.all(np.abs(outs[0] - naive.quantize_act(x) @ w.T) <= 1e-4 * scale), n
