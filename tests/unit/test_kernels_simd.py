"""The Q4 multiply-add flavours (x86 AVX2 / VNNI, the portable one ARM builds on), what they compile to on
ARM, the fused attention glue and the sampler: each against a twin outside the code under test (tests/naive.py,
the gguf package's quantizer, float64 numpy)."""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf.quants import quantize as gguf_quantize

import dllama.kernels as K
import naive  # tests/naive.py
from dllama.kernels import _matmul as mm
from dllama.kernels._simd import PORTABLE, simd_isa
from dllama.sampler import Sampler
from testlib import need

THREADS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})


def _host_flags():
    from llvmlite import binding

    return set(binding.get_host_cpu_features().flatten().split(","))


def _flavours():
    """Every flavour this host can run: the portable one always, AVX2 on 256-bit vectors on any AVX2 x86 (the
    users' case, also on an AVX-512 host), and the host's own."""
    out = {PORTABLE}
    kind, nbytes = simd_isa()
    if kind in ("avx2", "vnni"):
        out |= {("avx2", 32), (kind, nbytes)}
    return sorted(out)


_COMPILED = {}


def _kernel(qtype, kind, nbytes):
    key = ("q80" if qtype == "q80" else "q4", kind, nbytes)
    if key not in _COMPILED:
        _COMPILED[key] = mm._blocks(*key)
    return _COMPILED[key]


def _weights(qtype, rows, cols, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1)).astype(np.float32)
    w[0, :32] = 0
    w[1, :32] = -w[1, :32].max() * 1.0001  # Q8_0 quants of -127 and -128 x the scale: the extremes
    return gguf_quantize(w, {"q40": G.Q4_0, "q41": G.Q4_1, "q80": G.Q8_0}[qtype]).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
@pytest.mark.parametrize("flavour", _flavours(), ids=lambda f: f"{f[0]}{f[1]}")
@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}thr")
def test_q4_flavours_match_twin(qtype, flavour, threads):
    rows, cols = 200, 160   # a partial last tile; 5 blocks
    raw = _weights(qtype, rows, cols, 11)
    W = K.pack(qtype, raw, rows, cols)
    W.kernels = (_kernel(qtype, *flavour),) * 2
    wabs = np.abs(naive.dequantize(qtype, raw, rows, cols))
    rng = np.random.default_rng(3)
    K.set_threads(threads)
    try:
        for n in (1, 4, 7, 3, 2, 6, 5):   # one row, a full group of 4, groups and every remainder
            x = rng.standard_normal((n, cols)).astype(np.float32)
            out = np.full((n, rows), np.nan, np.float32)
            K.matmul(W, x, out)
            ref = naive.matmul(qtype, raw, rows, cols, x)
            assert np.all(np.abs(out - ref) <= 2e-6 * (np.abs(x) @ wabs.T) + 1e-30), (flavour, n)
    finally:
        K.set_threads(1)


@pytest.mark.parametrize("qtype", ["q40", "q80"])
def test_flavours_compute_identical_sums(qtype):
    # integer sums are exact, and the float part is the same code: every flavour gives the same bits
    raw = _weights(qtype, 130, 96, 5)
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    x[0, :32] = np.linspace(-1, 1, 32)   # activations quantized to +-127
    outs = []
    for flavour in _flavours():
        W = K.pack(qtype, raw, 130, 96)
        W.kernels = (_kernel(qtype, *flavour),) * 2
        out = np.empty((5, 130), np.float32)
        K.matmul(W, x, out)
        outs.append(out)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_simd_isa_reads_the_features():
    assert simd_isa("+avx2,+fma", "x86_64") == ("avx2", 32)
    assert simd_isa("+avx2,+avx512bw,+avx512vnni", "x86_64") == ("vnni", 64)
    assert simd_isa("+avx2,+avxvnni", "x86_64") == ("vnni", 32)
    assert simd_isa("+sse4.2", "x86_64") == PORTABLE
    assert simd_isa("+neon,+dotprod", "aarch64") == ("sdot", 16)
    assert simd_isa("+neon", "aarch64") == PORTABLE


# --- ARM: what the Pi 5 (Cortex-A76) would run, compiled here -------------------------------------


@pytest.fixture(scope="module")
def aarch64():
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    try:
        llvm.Target.from_triple("aarch64-unknown-linux-gnu")
    except RuntimeError as e:
        need(False, f"this llvmlite has no AArch64 target: {e}")
    from dllama.kernels import _cross

    return _cross


@pytest.mark.parametrize("kernel", ["q4", "q4k", "q5k", "q6k"])
def test_block_kernels_on_cortex_a76_are_sdot_without_scalar_fallback(aarch64, kernel):
    X = aarch64
    asm, symbol = X.target_asm(kernel, "aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod")
    body = X.function_body(asm, symbol)
    mix = X.instruction_mix(body)
    # 64 rows x 32 values per block, 16 products per sdot: 128 per activation row, for 1 and for 4 rows
    assert mix["vector", "sdot"] >= 128 * 5
    dot_loops = [lp for lp in X.loops(body) if "sdot" in lp]
    assert dot_loops
    # the basic blocks that multiply: the loop around them also holds the float part's scalar fallbacks
    # (taken when the scratch rows could overlap), checked below
    dot_blocks = [b for b in re.split(r"\n(?=\.LBB\w*:)", dot_loops[0]) if "sdot" in b]
    assert dot_blocks
    for block in dot_blocks:
        inner = X.instruction_mix(block)
        scalar_arith = sum(n for (cls, op), n in inner.items()
                           if cls == "fp-scalar" and op in ("fadd", "fmadd", "scvtf", "fcvt"))
        scalar_mul = sum(n for (cls, op), n in inner.items()
                         if cls == "scalar" and op in ("mul", "madd", "smull", "smaddl", "umull"))
        assert scalar_arith == 0
        # a scalar multiply per activation row and block at most (Q40's offset times the row's block sum,
        # then splat to the rows), against at least 16 sdots per activation row and block
        assert inner["fp-scalar", "fmul"] * 16 <= inner["vector", "sdot"]
        assert scalar_mul * 100 <= inner["vector", "sdot"]   # address arithmetic only
    # the float part (scales, accumulation) runs in vector lanes too; scalar only in loop remainders
    vec_fp = sum(n for (cls, op), n in mix.items() if cls == "vector" and op in ("fmul", "fadd", "fmla", "scvtf"))
    scalar_fp = sum(n for (cls, op), n in mix.items() if cls == "fp-scalar" and op in ("fmul", "fadd", "fmla", "scvtf"))
    assert vec_fp >= 4 * scalar_fp


@pytest.mark.parametrize("kernel,lines", [("q4", 16 + 2), ("q4k", 16 + 2 + 4), ("q6k", 24 + 2 + 2)])
@pytest.mark.parametrize("target", [("aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod", r"prfm\s+pldl1keep"),
                                    ("x86_64-unknown-linux-gnu", "znver3", "", r"prefetcht0\s")],
                         ids=["cortex-a76", "znver3"])
def test_block_kernels_prefetch_every_line_of_a_block_ahead(aarch64, target, kernel, lines):
    # One thread streams a matrix at read-then-compute speed unless it asks for the lines ahead (see _tiles):
    # each block's quants, its scales' lines, in each of the 4 activation-row counts' tiles
    triple, cpu, features, pattern = target
    asm, symbol = aarch64.target_asm(kernel, triple, cpu, features)
    assert len(re.findall(pattern, aarch64.function_body(asm, symbol))) >= lines * 4


def test_swiglu_on_cortex_a76_is_vectorised(aarch64):
    X = aarch64
    asm, symbol = X.target_asm("swiglu", "aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod")
    # a loop of whole vectors (expf's polynomial, the division, the gate), beside the scalar remainder loop
    loops = [X.instruction_mix(lp) for lp in X.loops(X.function_body(asm, symbol))]
    assert any(m["vector", "fmul"] >= 10 and m["vector", "fdiv"] and not m["fp-scalar", "fmul"] for m in loops)


# --- the attention glue and the sampler ---------------------------------------------------------


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_rope_qkv_matches_twin(neox, n):
    hd, heads, kv_heads, seq = 16, 4, 2, 10
    qd, kvd = heads * hd, kv_heads * hd
    rng = np.random.default_rng(n)
    qkv = rng.standard_normal((n, qd + 2 * kvd)).astype(np.float32)
    positions = np.array([7, 2, 9][:n], np.int64)
    spec = type("Spec", (), dict(head_dim=hd, rope_theta=10000.0, rope_type="falcon" if neox else "llama",
                                 extra=None))()
    cos, sin = K.rope_tables(spec, seq)
    q = np.full((n, qd), np.nan, np.float32)
    k_cache, v_cache = np.zeros((seq, kvd), np.float32), np.zeros((seq, kvd), np.float32)
    K.rope_qkv(qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:], positions, cos, sin, hd, neox, q,
               k_cache, v_cache)
    freqs = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    np.testing.assert_allclose(q, naive.rope(qkv[:, :qd], positions, freqs, hd, neox), atol=2e-6)
    np.testing.assert_allclose(k_cache[positions], naive.rope(qkv[:, qd:qd + kvd], positions, freqs, hd, neox),
                               atol=2e-6)
    np.testing.assert_array_equal(v_cache[positions], qkv[:, qd + kvd:])
    others = np.setdiff1d(np.arange(seq), positions)
    assert not k_cache[others].any() and not v_cache[others].any()
    with pytest.raises(ValueError):
        K.rope_qkv(qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:], positions + seq, cos, sin, hd, neox, q,
                   k_cache, v_cache)


def _softmax64(logits, temperature):
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def test_sampler_draws_the_softmax_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.0], np.float32)
    s = Sampler(temperature=0.7, topp=1.0, seed=4)
    draws = np.bincount([s(logits) for _ in range(20000)], minlength=6) / 20000
    p = _softmax64(logits, 0.7)
    assert np.all(np.abs(draws - p) <= 4 * np.sqrt(p * (1 - p) / 20000) + 1e-9)


def test_sampler_top_p_keeps_the_nucleus_only():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.0, 1.5], np.float32)
    topp = 0.7
    p = _softmax64(logits, 0.9)
    order = np.argsort(-p)
    nucleus = order[:np.searchsorted(np.cumsum(p[order]), topp) + 1]
    want = np.zeros_like(p)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    s = Sampler(temperature=0.9, topp=topp, seed=9)
    draws = np.bincount([s(logits) for _ in range(20000)], minlength=p.size) / 20000
    assert set(np.flatnonzero(draws)) == set(nucleus)
    assert np.all(np.abs(draws - want) <= 4 * np.sqrt(want * (1 - want) / 20000) + 1e-9)
    assert Sampler(temperature=0)(logits) == 4


def test_attention_on_cortex_a76_runs_its_loops_in_vector_lanes(aarch64):
    """The three loops of a head (q.k four keys at a time, exp of the scores, the weighted sum of values
    four rows at a time) are NEON loops with no scalar float arithmetic; scalar code is left to remainders."""
    X = aarch64
    asm, symbol = X.target_asm("attention", "aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod")
    fp = ("fmul", "fadd", "fsub", "fmla", "fmadd", "fdiv")
    loops = X.loops(X.function_body(asm, symbol))
    vector_loops = []
    for loop in loops:
        if any(other != loop and other in loop for other in loops):   # not innermost
            continue
        mix = X.instruction_mix(loop)
        vec = {op: n for (cls, op), n in mix.items() if cls == "vector" and op in fp}
        if vec.get("fmla", 0) + vec.get("fmul", 0) >= 2:
            vector_loops.append((vec, sum(n for (cls, op), n in mix.items() if cls == "fp-scalar" and op in fp)))
    assert all(scalar == 0 for _, scalar in vector_loops)
    assert any(vec.get("fmla", 0) >= 8 and not vec.get("fsub") for vec, _ in vector_loops)   # q.k, 4 keys
    assert any(vec.get("fsub") and vec.get("fmla", 0) >= 8 for vec, _ in vector_loops)       # exp(s - max)
    assert any(vec.get("fmul") and vec.get("fmla") and vec.get("fadd") for vec, _ in vector_loops)  # a.v, 4 rows
