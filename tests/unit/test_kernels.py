"""dllama.kernels against their plain-numpy twins (tests/naive.py), and the block layouts against
the `gguf` package's own quantizers, on awkward sizes: rows not a multiple of the tile, widths of an
odd number of blocks, batches of 1, 3 and 32, read-only (memory-mapped-like) weights."""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import dllama.kernels as K
from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec
import naive  # tests/naive.py: tests/ is on sys.path (pytest rootdir conftest)
from testlib import need

GGML = {"q40": G.Q4_0, "q41": G.Q4_1, "q80": G.Q8_0, "f16": G.F16, "f32": G.F32}
THREADS = [1, 2]   # the serial and the parallel variants (tests/conftest.py gives numba room for 2)
# |kernel - twin| / (|W| @ |x|): block types compute exactly in integers and round in float32 per
# block; f16 converts exactly and sums in float32.
TOL = {"q40": 2e-6, "q41": 2e-6, "q80": 2e-6, "f16": 2e-6, "f32": 2e-6}


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    need(request.param <= numba.config.NUMBA_NUM_THREADS,
         f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} leaves no room for {request.param} threads")
    K.set_threads(request.param)
    yield request.param
    K.set_threads(1)


def readonly(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def random_weights(qtype, rows, cols, seed):
    """Raw ggml bytes (read-only) of a random matrix with rows of very different scales."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1)).astype(np.float32)
    if rows > 2 and cols >= 64:
        w[1, :32] = 0  # a zero block: d = 0
        w[2, 32:64] = 0.5
    return readonly(gguf_quantize(w, GGML[qtype]).view(np.uint8).reshape(-1))


# --- block layouts: our twins decode what gguf encodes, and Q80 buffers are ggml's bytes ---------


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80", "f16"])
def test_naive_dequantize_matches_gguf(qtype):
    raw = random_weights(qtype, 5, 96, 1)
    ref = gguf_dequantize(raw.reshape(5, -1), GGML[qtype])
    np.testing.assert_array_equal(naive.dequantize(qtype, raw, 5, 96), ref.astype(np.float64))


@pytest.mark.parametrize("size", [32, 32 * 7, 32 * 129])
def test_quantize_q80_bytes_equal_gguf(size):
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size) * rng.uniform(1e-3, 50)).astype(np.float32)
    x[:32] = np.linspace(-127, 127, 32) / 2  # halfway cases: ggml rounds them away from zero
    if size > 64:
        x[32:64] = 0
    ref = gguf_quantize(x.reshape(-1, 32), G.Q8_0).reshape(-1)
    out = np.empty(size // 32 * K.Q80_BLOCK_BYTES, np.uint8)
    K.quantize_q80(readonly(x), out)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(naive.quantize_q80(x), ref)
    back = np.empty(size, np.float32)
    K.dequantize_q80(readonly(out), back)
    np.testing.assert_array_equal(back, gguf_dequantize(ref.reshape(-1, 34), G.Q8_0).reshape(-1))


def test_quantize_q80_rejects_bad_sizes():
    with pytest.raises(ValueError):
        K.quantize_q80(np.zeros(40, np.float32), np.zeros(34, np.uint8))
    with pytest.raises(ValueError):
        K.quantize_q80(np.zeros(64, np.float32), np.zeros(34, np.uint8))
    with pytest.raises(ValueError):
        K.dequantize_q80(np.zeros(34, np.uint8), np.zeros(32, np.float64))


# --- matmul -------------------------------------------------------------------------------------


def check_matmul(W, raw, qtype, rows, cols):
    rng = np.random.default_rng(7)
    wabs = np.abs(naive.dequantize(qtype, raw, rows, cols))
    for n in (1, 32, 3):  # growing then shrinking the activation scratch
        x = rng.standard_normal((n, cols)).astype(np.float32) * rng.uniform(0.1, 10, (n, 1)).astype(np.float32)
        out = np.full((n, rows), np.nan, np.float32)
        K.matmul(W, x, out)
        ref = naive.matmul(qtype, raw, rows, cols, x)
        scale = np.abs(x).astype(np.float64) @ wabs.T
        assert np.all(np.abs(out - ref) <= TOL[qtype] * scale + 1e-30), (qtype, n)
        # The quantized activations stay close to the exact float product (outside truth: gguf's weights).
        exact = x.astype(np.float64) @ naive.dequantize(qtype, raw, rows, cols).T
        assert np.all(np.abs(out - exact) <= 0.02 * scale + 1e-30), (qtype, n)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80", "f16", "f32"])
@pytest.mark.parametrize("rows,cols", [(77, 96), (130, 224), (1, 32), (128, 160)])
def test_matmul_matches_twin(qtype, rows, cols, threads):
    raw = random_weights(qtype, rows, cols, rows + cols)
    W = K.pack(qtype, raw, rows, cols)
    assert (W.rows, W.cols, W.qtype) == (rows, cols, qtype)
    check_matmul(W, raw, qtype, rows, cols)


@pytest.mark.parametrize("qtype", ["q40", "q41", "q80"])
@pytest.mark.parametrize("form", ["sweep", "regs"])
def test_matmul_both_batch_forms(qtype, form):
    # This CPU runs one batch form (Q80 on AVX-512: regs, AVX2: sweep; Q4: sweep is this x86's
    # multiply-add, regs the portable sums ARM runs); the other is checked here too, serially (its
    # parallel variant is the same body).
    from dllama.kernels import _matmul as mm

    raw = random_weights(qtype, 130, 224, 5)
    W = K.pack(qtype, raw, 130, 224)
    W.kernels = (mm._SWEEP[qtype], {"sweep": mm._SWEEP, "regs": mm._REGS}[form][qtype])
    check_matmul(W, raw, qtype, 130, 224)


def test_matmul_q40_with_f32_activations(threads):
    rows, cols = 70, 160
    raw = random_weights("q40", rows, cols, 3)
    W = K.pack("q40", raw, rows, cols)
    x = np.random.default_rng(3).standard_normal((3, cols)).astype(np.float32)
    out = np.empty((3, rows), np.float32)
    K.matmul(W, x, out, act="f32")
    ref = naive.matmul("q40", raw, rows, cols, x, act="f32")
    scale = np.abs(x).astype(np.float64) @ np.abs(naive.dequantize("q40", raw, rows, cols)).T
    assert np.all(np.abs(out - ref) <= 2e-6 * scale)


def test_matmul_fused_rows_equal_separate():
    # The model fuses wq|wk|wv by concatenating raw rows before packing.
    a, b = random_weights("q41", 40, 64, 1), random_weights("q41", 25, 64, 2)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    fused, oa, ob = np.empty((2, 65), np.float32), np.empty((2, 40), np.float32), np.empty((2, 25), np.float32)
    K.matmul(K.pack("q41", np.concatenate([a, b]), 65, 64), x, fused)
    K.matmul(K.pack("q41", a, 40, 64), x, oa)
    K.matmul(K.pack("q41", b, 25, 64), x, ob)
    np.testing.assert_array_equal(fused, np.concatenate([oa, ob], axis=1))


def test_pack_and_matmul_reject_bad_input():
    with pytest.raises(DllamaError, match="q50"):
        K.pack("q50", np.zeros(18, np.uint8), 1, 32)
    with pytest.raises(DllamaError, match="multiple of 32"):
        K.pack("q40", np.zeros(18, np.uint8), 1, 40)
    with pytest.raises(DllamaError, match="bytes"):
        K.pack("q80", np.zeros(35, np.uint8), 1, 32)
    W = K.pack("q40", np.zeros(36, np.uint8), 2, 32)
    with pytest.raises(ValueError):
        K.matmul(W, np.zeros((1, 64), np.float32), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError):
        K.matmul(W, np.zeros((1, 32), np.float64), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError):
        K.matmul(W, np.zeros((1, 32), np.float32), np.zeros((1, 2), np.float32), act="f16")


def test_set_threads_rejects_nonsense():
    with pytest.raises(DllamaError):
        K.set_threads(0)
    with pytest.raises(DllamaError):
        K.set_threads(numba.config.NUMBA_NUM_THREADS + 1)


# --- element-wise kernels ---------------------------------------------------------------------


def test_rmsnorm():
    rng = np.random.default_rng(0)
    x = readonly(rng.standard_normal((3, 96)).astype(np.float32) * 5)
    w = readonly(rng.standard_normal(96).astype(np.float32))
    out = np.empty_like(x)
    K.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, naive.rmsnorm(x, w, 1e-5), rtol=1e-6, atol=1e-6)


def spec_for(rope_type, head_dim=64, theta=500000.0):
    return ModelSpec(head_dim=head_dim, rope_type=rope_type, rope_theta=theta, rope_scaling_factor=32.0,
                     rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
                     rope_scaling_orig_max_seq_len=8192)


@pytest.mark.parametrize("rope_type", ["llama", "llama3.1", "falcon"])
def test_rope(rope_type):
    spec = spec_for(rope_type)
    seq_len = 20000  # past the original context: scaling matters
    cos, sin = K.rope_tables(spec, seq_len)
    assert cos.shape == sin.shape == (seq_len, 32) and cos.dtype == np.float32
    scaling = (32.0, 1.0, 4.0, 8192) if rope_type == "llama3.1" else None
    freqs = naive.rope_freqs(64, spec.rope_theta, scaling)
    positions = np.array([0, 1, 7, 19999], np.int64)
    np.testing.assert_allclose(cos[positions], np.cos(np.outer(positions, freqs)), atol=2e-7)
    x = np.random.default_rng(1).standard_normal((4, 3 * 64)).astype(np.float32)
    want = naive.rope(x, positions, freqs, 64, rope_type == "falcon")
    K.rope(x, positions, cos, sin, 64, rope_type == "falcon")
    np.testing.assert_allclose(x, want, atol=2e-6)


def test_llama31_scaling_changes_only_low_frequencies():
    plain = naive.rope_freqs(128, 500000.0)
    scaled = naive.rope_freqs(128, 500000.0, (8.0, 1.0, 4.0, 8192))
    assert scaled[0] == plain[0] and np.isclose(scaled[-1], plain[-1] / 8)
    c, _ = K.rope_tables(spec_for("llama3.1", 128), 3)
    np.testing.assert_allclose(c[2], np.cos(2 * naive.rope_freqs(128, 500000.0, (32.0, 1.0, 4.0, 8192))), atol=1e-7)


def test_activations_and_softmax():
    rng = np.random.default_rng(2)
    h = readonly(rng.standard_normal((3, 2 * 80)).astype(np.float32) * 4)
    out = np.empty((3, 80), np.float32)
    K.swiglu(h, 80, out)
    np.testing.assert_allclose(out, naive.swiglu(h, 80), rtol=1e-5, atol=1e-6)
    K.gelu_glu(h, 80, out)
    np.testing.assert_allclose(out, naive.gelu_glu(h, 80), rtol=1e-5, atol=1e-6)
    x = rng.standard_normal(77).astype(np.float32) * 20
    want = naive.softmax(x)
    K.softmax(x)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n_heads,n_kv_heads,positions", [
    (9, 3, [40]),                 # decode, GQA 3:1 (SmolLM2's heads)
    (4, 4, [0]),                  # first token
    (8, 2, list(range(5, 37))),   # a prompt batch of 32, causal within itself
    (6, 1, [3, 9, 4]),            # multi-query, unordered positions
])
def test_attention(n_heads, n_kv_heads, positions, threads):
    hd, seq_len = 64, 48
    rng = np.random.default_rng(n_heads)
    positions = np.array(positions, np.int64)
    q = readonly(rng.standard_normal((len(positions), n_heads * hd)).astype(np.float32))
    k_cache = readonly(rng.standard_normal((seq_len, n_kv_heads * hd)).astype(np.float32))
    v_cache = readonly(rng.standard_normal((seq_len, n_kv_heads * hd)).astype(np.float32))
    att = np.empty((n_heads, seq_len), np.float32)
    out = np.empty_like(q)
    K.attention(q, k_cache, v_cache, positions, n_heads, n_kv_heads, hd, att, out)
    want = naive.attention(q, k_cache, v_cache, positions, n_heads, n_kv_heads, hd)
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("heads", [range(2, 7), range(4, 5), range(0, 2), range(7, 9)])
def test_attention_of_heads_that_cut_through_kv_groups(heads, threads):
    """A node of an uneven split holds query heads from the middle of a KV head's group: its kernel call
    over its KV heads only must give the full attention's columns of those heads."""
    hd, seq_len, group, n_kv = 32, 16, 3, 3
    rng = np.random.default_rng(len(heads))
    positions = np.array([4, 9], np.int64)
    q = rng.standard_normal((2, 9 * hd)).astype(np.float32)
    k_cache = rng.standard_normal((seq_len, n_kv * hd)).astype(np.float32)
    v_cache = rng.standard_normal((seq_len, n_kv * hd)).astype(np.float32)
    want = naive.attention(q, k_cache, v_cache, positions, 9, n_kv, hd)[:, heads.start * hd:heads.stop * hd]
    kv = range(heads.start // group, -(-heads.stop // group))
    cols = slice(kv.start * hd, kv.stop * hd)
    out = np.empty((2, len(heads) * hd), np.float32)
    K.attention(np.ascontiguousarray(q[:, heads.start * hd:heads.stop * hd]), np.ascontiguousarray(k_cache[:, cols]),
                np.ascontiguousarray(v_cache[:, cols]), positions, len(heads), len(kv), hd,
                np.empty((len(heads), seq_len), np.float32), out, group=group, first=heads.start - kv.start * group)
    np.testing.assert_allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError):   # one KV head too many for these heads
        K.attention(q[:, :hd], k_cache[:, :2 * hd], v_cache[:, :2 * hd], positions, 1, 2, hd,
                    np.empty((1, seq_len), np.float32), np.empty((2, hd), np.float32), group=group, first=0)


def test_attention_rejects_positions_outside_the_cache():
    q = np.zeros((1, 64), np.float32)
    cache = np.zeros((8, 64), np.float32)
    with pytest.raises(ValueError):
        K.attention(q, cache, cache, np.array([8], np.int64), 1, 1, 64, np.zeros((1, 8), np.float32), q.copy())
    with pytest.raises(ValueError):
        K.attention(q, cache, cache, np.array([0], np.int64), 3, 2, 64, np.zeros((3, 8), np.float32), q.copy())


def test_expf_within_two_ulp_of_float64_exp():
    from numba import njit

    from dllama.kernels.ops import expf

    @njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = expf(x[i])

    x = np.concatenate([np.linspace(-100, 88.72, 200001, dtype=np.float32),
                        np.float32([0.0, 1e-8, -87.4, 89.0, np.inf, -np.inf])])
    out = np.empty_like(x)
    apply(x, out)
    ref = np.exp(x.astype(np.float64))
    normal = (ref > np.finfo(np.float32).tiny) & (ref < np.finfo(np.float32).max)
    assert np.all(np.abs(out[normal] - ref[normal]) <= 2 * 2.0 ** -24 * ref[normal])
    assert np.all(out[ref < np.finfo(np.float32).tiny] == 0) and np.all(np.isinf(out[ref > 3.5e38]))
    nan = np.full(3, np.nan, np.float32)
    apply(nan, out[:3])
    assert np.all(np.isnan(out[:3]))


def test_threads_apply_in_other_python_threads(threads):
    """A server runs the engine in a worker thread: the choice made in the main thread holds there too
    (1 thread: the serial variant; n: the parallel one on n of numba's threads)."""
    import threading

    need(threads < numba.config.NUMBA_NUM_THREADS,
         f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}: a new thread would start at {threads} already")
    W = K.pack("f16", np.zeros(64, np.uint8), 1, 32)
    serial, parallel = W.kernels
    ran = []
    W.kernels = (lambda *a: (ran.append(("serial",)), serial(*a)),
                 lambda *a: (ran.append(("parallel", numba.get_num_threads())), parallel(*a)))
    t = threading.Thread(target=K.matmul, args=(W, np.ones((1, 32), np.float32), np.empty((1, 1), np.float32)))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert ran == ([("serial",)] if threads == 1 else [("parallel", threads)])


# Run in a fresh process: in this one, earlier tests have compiled every kernel already.
WARMUP_THEN_FORWARD = """
import sys
import numpy as np
from numba.core.registry import CPUDispatcher
import dllama.kernels as K
from dllama.kernels import _attention, _matmul, ops, quant
from dllama.model.llama import NodeModel
from test_tensor_parallel import SPEC, build, random_tensors

def compiled():
    found = {}
    def walk(obj, name):
        if isinstance(obj, CPUDispatcher):
            found[name] = len(obj.signatures)
        elif isinstance(obj, (tuple, list, dict)):
            for k, o in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
                walk(o, f"{name}[{k!r}]")
    for mod in (_attention, _matmul, ops, quant):
        for k, v in vars(mod).items():
            walk(v, f"{mod.__name__}.{k}")
    return found

(model,) = build(SPEC, random_tensors(SPEC), 1)   # q40 weights, f32 embeddings and norms
K.set_threads(int(sys.argv[1]))
K.warmup(["q40"])                                  # what Engine asks for on such a model
before = compiled()
assert sum(before.values()) > 0, "warmup compiled nothing"
model.forward(np.array([5, 17, 3], np.int64), np.arange(3, dtype=np.int64))
model.forward(np.array([9], np.int64), np.array([3], np.int64))
after = compiled()
print(sorted(k for k in after if after[k] != before[k]))
"""


def test_after_warmup_a_forward_pass_compiles_nothing(threads):
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", WARMUP_THEN_FORWARD, str(threads)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"compiled after warmup: {proc.stdout}"


def test_elementwise_kernels_reject_mismatched_shapes():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError):
        K.rmsnorm(x, np.ones(32, np.float32), 1e-5, np.empty_like(x))
    cos = np.ones((4, 32), np.float32)
    with pytest.raises(ValueError):
        K.rope(x, np.array([0, 4], np.int64), cos, cos, 64, False)
    with pytest.raises(ValueError):
        K.swiglu(x, 16, np.empty((2, 16), np.float32))
