"""Element-wise kernels: RMS norm, rotary embeddings, gated activations, softmax.

All take their output arrays (no allocation per call) and float32 C-contiguous data.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from dllama.kernels._bits import _as_f32


@njit(inline="always", nogil=True, cache=True)
def expf(x):
    """float32 exp within 2 ulp, written so loops over it vectorise (libm's expf does not here).

    exp(x) = 2**n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by Cephes' expf
    polynomial, 2**n built from exponent bits. Below -87.3 (result under the smallest normal) it
    returns 0; above 88.7, inf; NaN gives NaN.
    """
    xc = min(max(x, np.float32(-87.33654)), np.float32(88.72284))
    n = np.floor(xc * np.float32(1.44269504) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    # 2**n as two factors: each exponent stays normal across the whole range (n from -126 to 128)
    n1 = np.int32(n) >> np.int32(1)
    n2 = np.int32(n) - n1
    y = y * _as_f32(np.uint32(n1 + np.int32(127)) << np.uint32(23))
    y = y * _as_f32(np.uint32(n2 + np.int32(127)) << np.uint32(23))
    y = np.float32(0.0) if x < np.float32(-87.33654) else y
    return y if x == x else x  # NaN stays NaN (the clamps above would hide it)


@njit(nogil=True, cache=True, error_model="numpy")
def rmsnorm(x, w, eps, out):
    """out (n, d) = x (n, d) / sqrt(mean(x**2) + eps) * w (d,); the sum of squares in float64."""
    n, d = x.shape
    if w.shape[0] != d or out.shape[0] != n or out.shape[1] != d:
        raise ValueError("rmsnorm: w must be (d,) and out (n, d) for x (n, d)")
    for i in range(n):
        ss = 0.0
        for j in range(d):
            ss += np.float64(x[i, j]) * np.float64(x[i, j])
        scale = np.float32(1.0 / math.sqrt(ss / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * w[j]


def rope_tables(spec, seq_len):
    """(cos, sin), each (seq_len, head_dim // 2) float32: the rotation of pair i at position p is
    p * theta**(-2i / head_dim), divided by a GGUF's `rope_freqs` factors where the file has them, else
    with Llama 3.1 frequency scaling when spec.rope_type is "llama3.1" (Meta's apply_scaling). Angles are computed in float64, then rounded once."""
    hd = spec.head_dim
    freqs = float(spec.rope_theta) ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    factors = (getattr(spec, "extra", None) or {}).get("rope_freqs")
    if factors is not None:
        # a GGUF's own per-frequency divisors (llama.cpp's `rope_freqs`): used as llama.cpp uses them
        freqs = freqs / np.asarray(factors, dtype=np.float64)
    elif spec.rope_type == "llama3.1":
        freqs = _llama31_scaling(freqs, spec.rope_scaling_factor, spec.rope_scaling_low_freq_factor,
                                 spec.rope_scaling_high_freq_factor, spec.rope_scaling_orig_max_seq_len)
    angles = np.outer(np.arange(seq_len, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _llama31_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    # Meta llama-models apply_scaling: long wavelengths are slowed by `factor`, short ones kept,
    # and the band between is interpolated.
    from dllama.errors import DllamaError

    if factor <= 0 or old_context_len <= 0 or not 0 < low_freq_factor < high_freq_factor:
        raise DllamaError(f"llama3.1 rope scaling needs factor > 0, original length > 0 and 0 < low < high "
                          f"frequency factor; got {factor}, {old_context_len}, {low_freq_factor}, {high_freq_factor}")
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * freqs / factor + smooth * freqs
    return np.where(wavelen < high_freq_wavelen, freqs, np.where(wavelen > low_freq_wavelen, freqs / factor, mid))


@njit(nogil=True, cache=True, error_model="numpy")
def rope(x, positions, cos, sin, head_dim, neox):
    """Rotate x (n, heads * head_dim) in place; row t at position positions[t].

    neox False ("llama"): pairs (x[2i], x[2i+1]); neox True ("falcon"/neox): pairs (x[i], x[i + hd/2]).
    """
    n, width = x.shape
    half = head_dim // 2
    if width % head_dim or head_dim % 2 or cos.shape[1] < half or sin.shape[1] < half:
        raise ValueError("rope: x width must be a multiple of an even head_dim covered by the tables")
    for t in range(n):
        if positions[t] < 0 or positions[t] >= min(cos.shape[0], sin.shape[0]):
            raise ValueError("rope: a position is outside the cos/sin tables")
    for t in range(n):
        _rotate(x[t], cos[positions[t]], sin[positions[t]], head_dim, neox)


@njit(inline="always", nogil=True, cache=True)
def _rotate(x, cos, sin, head_dim, neox):
    # one row x (heads * head_dim,) by the rotation of one position (cos, sin rows)
    half = head_dim // 2
    step = 1 if neox else 2
    other = half if neox else 1
    for h0 in range(0, x.shape[0], head_dim):
        for i in range(half):
            a = h0 + i * step
            b = a + other
            x0 = x[a]
            x1 = x[b]
            x[a] = x0 * cos[i] - x1 * sin[i]
            x[b] = x0 * sin[i] + x1 * cos[i]


@njit(nogil=True, cache=True, error_model="numpy")
def _rope_qkv(q_in, k_in, v_in, positions, bases, cos, sin, head_dim, neox, q, k_cache, v_cache):
    n = q_in.shape[0]
    kv_dim = k_in.shape[1]
    half = head_dim // 2
    if (q.shape[0] < n or q.shape[1] != q_in.shape[1] or k_cache.shape[1] != kv_dim or v_in.shape[1] != kv_dim
            or v_cache.shape[1] != kv_dim or q_in.shape[1] % head_dim or kv_dim % head_dim or head_dim % 2
            or cos.shape[1] < half or sin.shape[1] < half or bases.shape[0] < n):
        raise ValueError("rope_qkv: shapes of q, k, v, caches and tables do not fit")
    for t in range(n):
        if (positions[t] < 0 or positions[t] >= min(cos.shape[0], sin.shape[0]) or bases[t] < 0
                or bases[t] + positions[t] >= min(k_cache.shape[0], v_cache.shape[0])):
            raise ValueError("rope_qkv: a position is outside the tables or the KV cache")
    for t in range(n):
        p = positions[t]
        r = bases[t] + p
        for j in range(q_in.shape[1]):
            q[t, j] = q_in[t, j]
        for j in range(kv_dim):
            k_cache[r, j] = k_in[t, j]
            v_cache[r, j] = v_in[t, j]
        _rotate(q[t], cos[p], sin[p], head_dim, neox)
        _rotate(k_cache[r], cos[p], sin[p], head_dim, neox)


def rope_qkv(q_in, k_in, v_in, positions, cos, sin, head_dim, neox, q, k_cache, v_cache, bases=None):
    """The attention glue in one call: q (n, q_dim) = rope(q_in); k_cache[bases + positions] = rope(k_in);
    v_cache[bases + positions] = v_in. Inputs may be column slices of one fused qkv output; rotation as
    `rope`, by each row's position; `bases` (n,) places each row's sequence in the cache (None: at row 0)."""
    if bases is None:
        bases = zero_bases(q_in.shape[0])
    _rope_qkv(q_in, k_in, v_in, positions, bases, cos, sin, head_dim, neox, q, k_cache, v_cache)


_ZEROS = np.zeros(32, np.int64)


def zero_bases(n: int) -> np.ndarray:
    """n zero cache offsets (one sequence at the start of the cache), without allocating per call."""
    global _ZEROS
    if n > _ZEROS.shape[0]:
        _ZEROS = np.zeros(n, np.int64)
    return _ZEROS[:n]


@njit(inline="always", nogil=True, cache=True)
def _check_glu(h, hidden, out):
    if h.shape[1] != 2 * hidden or out.shape[0] != h.shape[0] or out.shape[1] < hidden:
        raise ValueError("gated activation: h must be (n, 2 * hidden) and out (n, >= hidden)")


@njit(nogil=True, cache=True, error_model="numpy")
def swiglu(h, hidden, out):
    """h (n, 2 * hidden) = [w1 x | w3 x] -> out (n, hidden) = silu(w1 x) * w3 x."""
    _check_glu(h, hidden, out)
    for i in range(h.shape[0]):
        for j in range(hidden):
            a = h[i, j]
            out[i, j] = a / (np.float32(1.0) + expf(-a)) * h[i, hidden + j]


@njit(nogil=True, cache=True, error_model="numpy")
def gelu_glu(h, hidden, out):
    """h (n, 2 * hidden) = [w1 x | w3 x] -> out (n, hidden) = gelu(w1 x) * w3 x (tanh GELU, as ggml and Grok)."""
    _check_glu(h, hidden, out)
    k = np.float32(math.sqrt(2.0 / math.pi))
    for i in range(h.shape[0]):
        for j in range(hidden):
            a = h[i, j]
            # 0.5 a (1 + tanh(y)) = a / (1 + exp(-2y)): no cancellation for negative a, and
            # through expf the loop vectorises
            y = k * (a + np.float32(0.044715) * a * a * a)
            g = a / (np.float32(1.0) + expf(np.float32(-2.0) * y))
            out[i, j] = g * h[i, hidden + j]


@njit(nogil=True, cache=True, error_model="numpy")
def softmax(x):
    """x (n,) -> exp(x - max) / sum, in place."""
    if x.size == 0:
        return
    m = x[0]
    for i in range(1, x.size):
        m = max(m, x[i])
    for i in range(x.size):
        x[i] = expf(x[i] - m)
    s = 0.0
    for i in range(x.size):
        s += x[i]
    inv = np.float32(1.0 / s)
    for i in range(x.size):
        x[i] *= inv
