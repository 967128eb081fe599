"""GGUF block types beyond the 32-value ones dllama writes: K-quants, BF16, Q5_0/Q5_1 (read only).

Byte layouts, as ggml defines them (offsets in bytes; f16 = IEEE half; a super-block holds 256 values,
the value index is v):

    q2k  (Q2_K, 84):  scales[16] (low nibble: scale, high: min, per 16 values), qs[64] (2 bits, 4 per byte:
         byte 32h + l holds values 128h + 32s + l at bits 2s), f16 d, f16 dmin;  v = d*sc*q - dmin*m
    q3k  (Q3_K, 110): hmask[32] (bit k of byte l: high bit of value 32k + l... per 128-half, see _q3k),
         qs[64] (2 low bits, as q2k), scales[12] (sixteen 6-bit scales, biased by 32), f16 d;
         v = d*(sc-32)*(q - 4 if the high bit is 0)
    q4k  (Q4_K, 144): f16 d, f16 dmin, scales[12] (eight 6-bit scales and mins, `k4_scales`),
         qs[128] (byte 32j + l: low nibble value 64j + l, high nibble value 64j + 32 + l);  v = d*sc*q - dmin*m
    q5k  (Q5_K, 176): as q4k with qh[32] before qs: bit j of qh[l] is the fifth bit of value 32j + l
    q6k  (Q6_K, 210): ql[128], qh[64], int8 scales[16] (per 16 values), f16 d;
         v = d*sc*(q - 32), q 6 bits: 4 from ql, 2 from qh (see _q6k)
    q50  (Q5_0, 22): f16 d, qh u32 (bit j: fifth bit of value j), 16 bytes of nibbles as q40; v = d*(q - 16)
    q51  (Q5_1, 24): f16 d, f16 m, qh u32, nibbles;  v = d*q + m
    bf16 (2 per value): the upper half of a float32

The dequantizers are numpy, and their float operations are ggml's, in its order, so the results equal
`gguf.quants.dequantize` bit for bit (tests/unit/test_kquants.py).
"""

from __future__ import annotations

import numpy as np

_F = np.float32


def _half(b: np.ndarray) -> np.ndarray:
    # two bytes per row -> (n, 1) f32
    return np.ascontiguousarray(b).view(np.float16).astype(_F)


def k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K/Q5_K blocks (n, 12) -> (scales, mins), each (n, 8) uint8 in 0..63.

    Sub-blocks 0-3 keep their 6 bits in bytes 0-3 (scale) and 4-7 (min); 4-7 their low 4 bits in the
    nibbles of bytes 8-11 and their top 2 bits in the top bits of bytes 0-3 (scale) and 4-7 (min)."""
    lo, hi, tail = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (tail & 15) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc, m


def _nibbles64(qs: np.ndarray) -> np.ndarray:
    # Q4_K/Q5_K quants (n, 128) -> (n, 8, 32): chunk j of 32 bytes gives sub-blocks 2j (low) and 2j+1 (high)
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(15)).reshape(-1, 8, 32)


def _bits(b: np.ndarray, n_shifts: int, width: int) -> np.ndarray:
    # bytes (n, k, 32) -> (n, k * n_shifts, 32): fields of `width` bits, lowest first
    shifts = (np.arange(n_shifts, dtype=np.uint8) * np.uint8(width)).reshape(1, 1, n_shifts, 1)
    out = (b[:, :, None, :] >> shifts) & np.uint8((1 << width) - 1)
    return out.reshape(b.shape[0], -1, 32)


def _q4k(b: np.ndarray) -> np.ndarray:
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, m = k4_scales(b[:, 4:16])
    dl = (d * sc.astype(_F))[:, :, None]
    ml = (dmin * m.astype(_F))[:, :, None]
    return (dl * _nibbles64(b[:, 16:144]).astype(_F) - ml).reshape(-1, 256)


def q5k_values(b: np.ndarray) -> np.ndarray:
    """Q5_K blocks (n, 176) -> their quants (n, 8, 32) uint8 in 0..31, per 32-value sub-block."""
    high = _bits(b[:, None, 16:48], 8, 1)           # (n, 8, 32): bit j of byte l for value 32j + l
    return _nibbles64(b[:, 48:176]) | (high << np.uint8(4))


def _q5k(b: np.ndarray) -> np.ndarray:
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, m = k4_scales(b[:, 4:16])
    dl = (d * sc.astype(_F))[:, :, None]
    ml = (dmin * m.astype(_F))[:, :, None]
    return (dl * q5k_values(b).astype(_F) - ml).reshape(-1, 256)


def q6k_values(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks (n, 210) -> their quants less 32, (n, 8, 32) int8 in -32..31, per 32 values."""
    ql, qh = b[:, 0:128], b[:, 128:192]
    # each half of 128 values: ql bytes 64h..64h+63 (low nibbles, then high), qh bytes 32h..32h+31 (2-bit fields)
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
    high = _bits(qh.reshape(-1, 2, 32), 4, 2)        # (n, 8, 32)
    return (low.reshape(-1, 8, 32) | (high << np.uint8(4))).astype(np.int8) - np.int8(32)


def _q6k(b: np.ndarray) -> np.ndarray:
    sc = b[:, 192:208].view(np.int8).astype(_F)
    dl = (_half(b[:, 208:210]) * sc)[:, :, None]     # (n, 16, 1): one scale per 16 values
    return (dl * q6k_values(b).reshape(-1, 16, 16).astype(_F)).reshape(-1, 256)


def _q2k(b: np.ndarray) -> np.ndarray:
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
    dl = (d * (scales & np.uint8(15)).astype(_F))[:, :, None]
    ml = (dmin * (scales >> np.uint8(4)).astype(_F))[:, :, None]
    q = _bits(qs.reshape(-1, 2, 32), 4, 2).reshape(-1, 16, 16).astype(_F)
    return (dl * q - ml).reshape(-1, 256)


def _q3k(b: np.ndarray) -> np.ndarray:
    hmask, qs, s = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _half(b[:, 108:110])
    # sixteen 6-bit scales: low 4 bits in the nibbles of bytes 0-7 (scales 0-7 low, 8-15 high), top 2 bits
    # in the 2-bit fields of bytes 8-11
    lo = np.concatenate([s[:, 0:8] & np.uint8(15), s[:, 0:8] >> np.uint8(4)], axis=1)
    hi = ((s[:, None, 8:12] >> (np.arange(4, dtype=np.uint8) * np.uint8(2)).reshape(1, 4, 1)) & np.uint8(3))
    sc = (lo | (hi.reshape(-1, 16) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = (d * sc.astype(_F))[:, :, None]
    low = _bits(qs.reshape(-1, 2, 32), 4, 2)         # (n, 8, 32)
    high = _bits(hmask[:, None, :], 8, 1) ^ np.uint8(1)  # a clear high bit subtracts 4
    q = low.astype(np.int8) - (high << np.uint8(2)).astype(np.int8)
    return (dl * q.reshape(-1, 16, 16).astype(_F)).reshape(-1, 256)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    # the u32 of Q5_0/Q5_1 (n, 4 bytes) -> (n, 32): bit j is value j's fifth bit
    return _bits(qh[:, None, :], 8, 1).reshape(-1, 8, 4).transpose(0, 2, 1).reshape(-1, 32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    # 16 bytes (n, 16) -> (n, 32): low nibbles values 0-15, high nibbles 16-31 (ggml's Q4_0 order)
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1)


def _q50(b: np.ndarray) -> np.ndarray:
    q = _nibbles32(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << np.uint8(4))
    return _half(b[:, 0:2]) * (q.astype(np.int8) - np.int8(16)).astype(_F)


def _q51(b: np.ndarray) -> np.ndarray:
    q = _nibbles32(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << np.uint8(4))
    return _half(b[:, 0:2]) * q.astype(_F) + _half(b[:, 2:4])


def _bf16(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(_F)


DEQUANTIZERS = {"q2k": _q2k, "q3k": _q3k, "q4k": _q4k, "q5k": _q5k, "q6k": _q6k, "q50": _q50, "q51": _q51,
                "bf16": _bf16}
