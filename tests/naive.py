"""Plain-numpy twins of every kernel in dllama.kernels, written for clarity, computed in float64.

Weight blocks are decoded straight from ggml's byte layout (tests check these decoders against the
`gguf` package), and the matmul twin spells out the arithmetic the kernels promise: Q80-quantized
activations times dequantized weights.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_BYTES = {"q40": 18, "q41": 20, "q80": 34}


def dequantize(qtype, raw, rows, cols):
    """Raw ggml bytes of a (rows, cols) matrix -> float64 (rows, cols)."""
    raw = np.asarray(raw, np.uint8).reshape(-1)
    if qtype == "f32":
        return raw.view(np.float32).reshape(rows, cols).astype(np.float64)
    if qtype == "f16":
        return raw.view(np.float16).reshape(rows, cols).astype(np.float64)
    blocks = raw.reshape(rows * cols // 32, BLOCK_BYTES[qtype])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)  # (nblocks, 1)
    if qtype == "q80":
        return (blocks[:, 2:].view(np.int8) * d).reshape(rows, cols)
    nibbles = blocks[:, 4:] if qtype == "q41" else blocks[:, 2:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=1).astype(np.float64)  # values j, then j + 16
    if qtype == "q40":
        return ((q - 8) * d).reshape(rows, cols)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    return (q * d + m).reshape(rows, cols)


# where each type keeps its f16 scales (byte offsets): random bytes there could be inf or NaN
HALVES = {"q2k": (80, 82), "q3k": (108,), "q4k": (0, 2), "q5k": (0, 2), "q6k": (208,), "q50": (0,),
          "q51": (0, 2), "bf16": ()}


def random_blocks(qtype: str, n: int, seed: int) -> np.ndarray:
    """n blocks of random bytes, with finite random f16 scales of mixed sign and magnitude."""
    from dllama import quants

    q = quants.QUANTS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, q.type_size), dtype=np.uint8)
    for off in HALVES[qtype]:
        h = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 2, n)).astype(np.float16)
        raw[:, off:off + 2] = h.view(np.uint8).reshape(n, 2)
    if qtype == "bf16":   # keep exponents finite: inf/NaN patterns are not weights
        raw[:, 1] &= 0xBF
    return raw


def roundf(v):
    """C roundf: halves away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_q80(x):
    """x (size a multiple of 32) float32 -> ggml Q8_0 bytes, (size // 32 * 34,) uint8."""
    blocks = np.asarray(x, np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = roundf((blocks * inv[:, None]).astype(np.float64)).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def quantize_act(x):
    """x (n, cols) -> the float64 values the kernels actually multiply: per block of 32,
    round(x / d) * d with d = max|x| / 127 (float32 scale, not rounded to f16)."""
    blocks = np.asarray(x, np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = roundf((blocks * inv[:, None]).astype(np.float64))
    return (q * d[:, None].astype(np.float64)).reshape(np.shape(x))


def matmul(qtype, raw, rows, cols, x, act="q80"):
    """x (n, cols) @ W.T -> (n, rows), float64; block types take Q80 activations unless act='f32'."""
    w = dequantize(qtype, raw, rows, cols)
    xv = quantize_act(x) if qtype in BLOCK_BYTES and act == "q80" else np.asarray(x, np.float64)
    return xv @ w.T


def rmsnorm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * w


def rope_freqs(head_dim, theta, scaling=None):
    """Meta's precompute_freqs_cis frequencies; `scaling` = (factor, low, high, old_len) applies
    llama-models' apply_scaling, transcribed loop for loop."""
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return np.array(freqs)
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = scaling
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return np.array(new_freqs)


def rope(x, positions, freqs, head_dim, neox):
    """Meta's complex-number form for adjacent pairs; Hugging Face's rotate_half form for neox."""
    n, width = x.shape
    xh = np.asarray(x, np.float64).reshape(n, width // head_dim, head_dim)
    angles = np.outer(positions, freqs)[:, None, :]  # (n, 1, hd/2)
    if not neox:
        xc = xh[..., 0::2] + 1j * xh[..., 1::2]
        r = xc * np.exp(1j * angles)
        out = np.stack([r.real, r.imag], axis=-1)
    else:
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
        half = head_dim // 2
        rotated = np.concatenate([-xh[..., half:], xh[..., :half]], axis=-1)
        out = xh * cos + rotated * sin
    return out.reshape(n, width)


def attention(q, k_cache, v_cache, positions, n_heads, n_kv_heads, head_dim):
    """Meta's attention: repeat_kv, scores / sqrt(hd), mask above each row's position, softmax."""
    n = q.shape[0]
    seq = max(positions) + 1
    rep = n_heads // n_kv_heads
    qh = np.asarray(q, np.float64).reshape(n, n_heads, head_dim).transpose(1, 0, 2)
    k = np.repeat(np.asarray(k_cache[:seq], np.float64).reshape(seq, n_kv_heads, head_dim), rep, axis=1)
    v = np.repeat(np.asarray(v_cache[:seq], np.float64).reshape(seq, n_kv_heads, head_dim), rep, axis=1)
    scores = qh @ k.transpose(1, 2, 0) / math.sqrt(head_dim)  # (heads, n, seq)
    mask = np.arange(seq)[None, :] > np.asarray(positions)[:, None]
    scores = np.where(mask[None], -np.inf, scores)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(n, n_heads * head_dim)


def silu(a):
    return a / (1 + np.exp(-a))


def swiglu(h, hidden):
    h = np.asarray(h, np.float64)
    return silu(h[:, :hidden]) * h[:, hidden:]


def gelu_tanh(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


def gelu_glu(h, hidden):
    h = np.asarray(h, np.float64)
    return gelu_tanh(h[:, :hidden]) * h[:, hidden:]


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()
