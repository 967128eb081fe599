"""Weight matrices: packed once at load, multiplied every token.

    W = pack(qtype, raw_rows, rows, cols)   # raw ggml bytes of `rows` rows, row-major
    matmul(W, x, out)                      # x (n, cols) f32 -> out (n, rows) f32, out = x @ W.T

Packed layout (why it is fast): rows are cut into tiles of TILE consecutive output rows (the last
tile zero-padded). Within a tile, for each block of 32 columns, the rows sit side by side (f16: value
c of every row; block types: 4 bytes of every row), so a vector holds several rows, every row of a tile
multiplies the same activation values, and there are no cross-lane sums. Scales stay IEEE half (no
bytes added): d[tile, block, row].

    q40  qs (tiles, blocks, 4, TILE, 4) uint8: byte 4q + c of row r at [t, b, q, r, c]; low nibble =
         value 4q + c, high = value 16 + 4q + c; (q - 8) * d. Each row's bytes in quads: the form the
         integer multiply-adds take (see _simd)
    q41  qs as q40, d and m (tiles, blocks, TILE) f16 bits;  q * d + m
    q80  qs (tiles, blocks, 8, TILE, 4) int8: value 4q + c of row r at [t, b, q, r, c];   q * d
    f16  w (tiles, cols, TILE) f16 bits
    f32  w (rows, cols) f32, the raw bytes viewed in place (numpy BLAS)

Block weights multiply Q80-quantized activations in integer arithmetic, as llama.cpp does:
sum((q - 8) d x) = d dx (sum(q xq) - 8 sum(xq)), so the -8 (Q40) and the m (Q41) leave the inner
loop. The integer sums run on the CPU's integer multiply-add (dllama.kernels._simd).
"""

from __future__ import annotations

import platform
import types

import numba
import numpy as np
from numba import get_thread_id, njit, prange

from dllama import quants
from dllama.kernels import _threads
from dllama.kernels._bits import f16_to_f32
from dllama.kernels import _simd, _tiles
from dllama.kernels._simd import PORTABLE, simd_isa
from dllama.kernels._tiles import tile_intrinsic
from dllama.kernels.quant import quantize_act

TILE = 64  # rows per tile; the kernels spell it as the literal 64 (numba freezes globals)
BLOCK_BYTES = quants.BLOCK_BYTES


# --- the kernels: one body each, compiled serial and parallel --------------------------------


def _mm_blocks(qs, d, m, x, xq, xd, xs, out, fs):
    # W q40, q41 or q80 (rows, cols) @ x (n, cols) -> out (n, rows). A q41 matrix brings its m
    # (value = q * d + m); q40 and q80 an empty m (value = (q - 8) * d for q40, q * d for q80).
    # _tile (one tile for up to 4 activation rows, see _tiles) is bound per weight type and CPU flavour.
    # fs (threads, >= 4, 64) f32: each thread's tile results, allocated with the matrix.
    quantize_act(x, xq, xd, xs)
    ntiles = qs.shape[0]
    T = 64
    n = x.shape[0]
    q41 = m.shape[0] == ntiles
    for t in prange(ntiles):
        acc = fs[get_thread_id()]
        # up to 4 activation rows share each load of the weights (prompt batches); the tile's weights
        # stay in L2 between the groups of 4
        for i0 in range(0, n, 4):
            k = min(4, n - i0)
            _tile(qs, d, m, t, xq, xd, xs, i0, k, q41, acc)
            for i in range(k):
                _store_row(acc[i], out[i0 + i], t * T)


@njit(inline="always", nogil=True, cache=True)
def _store_row(acc, out, r0):
    for r in range(min(64, out.shape[0] - r0)):
        out[r0 + r] = acc[r]


@njit(inline="always", nogil=True, cache=True)
def _store(acc, out, r0):
    # Accumulating in a per-tile local and copying out once keeps the row loop vectorised under
    # parallel=True (stores straight into `out` did not).
    for i in range(acc.shape[0]):
        for r in range(min(acc.shape[1], out.shape[1] - r0)):
            out[i, r0 + r] = acc[i, r]


def _mm_f16(w, x, out, fs):
    # W f16 (rows, cols) @ x (n, cols) f32 -> out (n, rows); fs (threads, >= n + 1, 64) f32: each
    # thread's accumulators and converted weights, kept by the matrix
    ntiles, cols = w.shape[0], w.shape[1]
    T = 64  # TILE, as a literal: the compiler unrolls the row loop into whole vector registers
    n = x.shape[0]
    for t in prange(ntiles):
        scratch = fs[get_thread_id()]
        acc = scratch[:n]
        wf = scratch[n]
        acc[:] = 0
        for c in range(cols):
            for r in range(T):
                wf[r] = f16_to_f32(w[t, c, r])
            for i in range(n):
                xv = x[i, c]
                for r in range(T):
                    acc[i, r] += wf[r] * xv
        _store(acc, out, t * T)


def _mm_q40_f32(qs, d, x, out):
    # W q40 @ x f32 without quantizing x: the slow, exact-activation path
    ntiles, nb = qs.shape[0], qs.shape[1]
    T = 64  # TILE, as a literal: the compiler unrolls the row loop into whole vector registers
    n = x.shape[0]
    for t in prange(ntiles):
        acc = np.zeros((n, T), np.float32)
        s = np.empty(T, np.float32)
        for b in range(nb):
            for i in range(n):
                s[:] = 0
                sx = np.float32(0.0)
                for j in range(16):
                    xl = x[i, b * 32 + j]
                    xh = x[i, b * 32 + 16 + j]
                    sx += xl + xh
                    for r in range(T):
                        q = qs[t, b, j // 4, r, j % 4]
                        s[r] += np.float32(q & np.uint8(15)) * xl + np.float32(q >> np.uint8(4)) * xh
                for r in range(T):
                    acc[i, r] += f16_to_f32(d[t, b, r]) * (s[r] - np.float32(8.0) * sx)
        _store(acc, out, t * T)


@njit(inline="always", nogil=True, cache=True)
def _thread_zero():
    return 0


def _bound(fn, name, **bind):
    """A copy of kernel body `fn` named fn.__name__ + name, some of its globals replaced by `bind`.

    numba keys its on-disk cache by qualified name and line, not by compile flags or globals: each
    variant of one body must be a distinct function or they would load each other's code."""
    code = fn.__code__.replace(co_name=fn.__name__ + name, co_qualname=fn.__qualname__ + name)
    return types.FunctionType(code, dict(fn.__globals__, **bind), fn.__name__ + name)


def _variants(fn, suffix="", **bind):
    """(serial, parallel) compiled variants of one kernel body: a parallel call wakes threads
    (~1-25 us depending on numba's threading layer), so with one thread the serial one runs.
    `bind` replaces globals of the body (a flavour, named by `suffix`, with its own cache entries)."""
    # The serial variant is thread 0: numba's get_thread_id, loaded from the cache before any
    # parallel call has started the thread pool, would read an unset pointer.
    return (njit(nogil=True, cache=True)(_bound(fn, suffix + "_serial", get_thread_id=_thread_zero, **bind)),
            njit(nogil=True, cache=True, parallel=True)(_bound(fn, suffix, **bind) if suffix or bind else fn))


def _tile_fn(kind, nbytes, signed, bits):
    """tile(qs, d, m, t, xq, xd, xs, i0, k, q41, acc) for k <= 4 activation rows (see _tiles), Q40 and Q41
    (`q41`) or Q80 (`signed`) weights: one intrinsic per row count and weight type."""
    q40 = _by_rows(*(tile_intrinsic(k, kind, nbytes, signed, bits=bits) for k in (1, 2, 3, 4)))
    q41 = q40 if signed else _by_rows(*(tile_intrinsic(k, kind, nbytes, q41=True, bits=bits) for k in (1, 2, 3, 4)))

    @njit(inline="always", nogil=True, cache=True)
    def tile(qs, d, m, t, xq, xd, xs, i0, k, is41, acc):
        if is41:
            q41(qs, d, m, t, xq, xd, xs, i0, k, acc)
        else:
            q40(qs, d, m, t, xq, xd, xs, i0, k, acc)

    return tile


def _by_rows(one, two, three, four):
    """One tile intrinsic per activation row count (1 to 4) behind one call taking the count k."""

    @njit(inline="always", nogil=True, cache=True)
    def tile(qs, d, m, t, xq, xd, xs, i0, k, acc):
        if k == 4:
            four(qs, d, m, t, xq, xd, xs, i0, acc)
        elif k == 1:
            one(qs, d, m, t, xq, xd, xs, i0, acc)
        elif k == 2:
            two(qs, d, m, t, xq, xd, xs, i0, acc)
        else:
            three(qs, d, m, t, xq, xd, xs, i0, acc)

    return tile


def _blocks(qtype, kind, nbytes):
    """(serial, parallel) block kernel for one weight type ('q4': q40 and q41, or 'q80') and flavour."""
    signed = qtype == "q80"
    return _variants(_mm_blocks, f"_{qtype}_{kind}{nbytes}_{_SIMD_TAG}",
                     _tile=_tile_fn(kind, nbytes, signed, halves_by_bits(kind)))


def halves_by_bits(kind) -> bool:
    """Whether a flavour's kernels convert f16 scales by bit arithmetic: x86 with AVX2 has F16C and every
    ARMv8 converts halves; the portable flavour may run on neither on x86."""
    return (kind, platform.machine().lower()) == ("generic", "x86_64")


def _source_tag(module):
    # numba invalidates a cached kernel when its own file changes, not when the intrinsics it inlines
    # from another file do: their source's hash goes into the kernel's name instead
    import hashlib

    with open(module.__file__, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:8]


_SIMD_TAG = _source_tag(_simd) + _source_tag(_tiles)


_ISA = simd_isa()
# per type: (matrix-vector, matrix-matrix) x (serial, parallel); one block kernel serves both. _ANY: the
# portable flavour (ARM without dotprod runs it; tests check it here and compile the ARM ones, see _cross).
_Q4, _Q80 = _blocks("q4", *_ISA), _blocks("q80", *_ISA)
_Q4_ANY, _Q80_ANY = (_Q4, _Q80) if _ISA == PORTABLE else (_blocks("q4", *PORTABLE), _blocks("q80", *PORTABLE))
_SWEEP = {"q40": _Q4, "q41": _Q4, "q80": _Q80}            # this CPU's flavour
_REGS = {"q40": _Q4_ANY, "q41": _Q4_ANY, "q80": _Q80_ANY}  # the portable one, compiled on first use only
_KERNELS = {"q40": (_Q4, _Q4), "q41": (_Q4, _Q4), "q80": (_Q80, _Q80),
            "f16": _variants(_mm_f16), "q40_f32": _variants(_mm_q40_f32)}


# --- packing -----------------------------------------------------------------------------------


class Packed:
    """A weight matrix in the tile layout above, with the scratch its activations quantize into.

    rows, cols, qtype; nbytes = bytes of packed weights (equal to the ggml bytes plus tile padding).
    """

    __slots__ = ("qtype", "rows", "cols", "nbytes", "qs", "d", "m", "w", "kernels", "xq", "xd", "xs", "fs")

    def __init__(self, qtype, rows, cols):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        self.qs = self.d = self.m = self.w = None
        self.kernels = _KERNELS.get(qtype)
        self.xq = self.xd = self.xs = None
        if qtype in BLOCK_BYTES:
            self._grow(1)
        # each thread's tile accumulators (Q4 kernels): prepared here, not per tile per call
        threads = numba.config.NUMBA_NUM_THREADS
        self.fs = np.empty((threads, 6, TILE), np.float32) if qtype in BLOCK_BYTES else None

    def _grow(self, n):
        # Scratch for the Q80 activations, sized for the largest batch seen: no allocation per call.
        nb = self.cols // 32
        self.xq = np.empty((n, self.cols), np.int8)
        self.xd = np.empty((n, nb), np.float32)
        self.xs = np.empty((n, nb), np.float32)

    def __repr__(self):
        return f"Packed({self.qtype}, {self.rows}x{self.cols}, {self.nbytes} bytes)"


def _tiles(a, rows, tile):
    """(rows, *rest) -> (tiles, *rest, tile): row r of tile t at [t, ..., r], zero-padded."""
    ntiles = -(-rows // tile)
    padded = a
    if rows % tile:  # only the last tile needs padding: skip the extra copy when none does
        padded = np.zeros((ntiles * tile,) + a.shape[1:], a.dtype)
        padded[:rows] = a
    padded = padded.reshape((ntiles, tile) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(padded, 1, -1))


def pack(qtype, raw_rows, rows, cols):
    """Repack `rows` rows of raw ggml bytes (uint8, row-major, may be read-only) for matmul.

    Raises DllamaError for an unknown type, a width that is not a multiple of 32 for block
    types, or a byte count that does not match rows x cols.
    """
    from dllama.errors import DllamaError

    try:
        row_bytes = quants.row_bytes(qtype, cols)
    except DllamaError as exc:
        raise DllamaError(f"{qtype} matrix of {rows}x{cols}: {exc}") from None
    raw = np.asarray(raw_rows).reshape(-1).view(np.uint8)
    if raw.size != rows * row_bytes:
        raise DllamaError(f"{qtype} matrix of {rows}x{cols} needs {rows * row_bytes} bytes, got {raw.size}")
    W = Packed(qtype, rows, cols)
    if qtype == "f32":
        W.w = raw.view(np.float32).reshape(rows, cols)
    elif qtype == "f16":
        W.w = _tiles(raw.view(np.uint16).reshape(rows, cols), rows, TILE)
    else:
        blocks = raw.reshape(rows, cols // 32, BLOCK_BYTES[qtype])
        d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.uint16)[..., 0]
        W.d = _tiles(d, rows, TILE)
        if qtype == "q41":
            W.m = _tiles(np.ascontiguousarray(blocks[:, :, 2:4]).view(np.uint16)[..., 0], rows, TILE)
        else:
            W.m = _NO_M  # one signature for every block type; its length tells q40 from q41
        qs = blocks[:, :, 4:] if qtype == "q41" else blocks[:, :, 2:]
        # quads of each row's bytes side by side (see _simd): rows (rows, blocks, quads, 4) moved as
        # 4-byte units to (tiles, blocks, quads, TILE, 4), in one copy
        quads = _tiles(np.ascontiguousarray(qs).view(np.uint32), rows, TILE)
        W.qs = quads.view(np.int8 if qtype == "q80" else np.uint8).reshape(quads.shape[:3] + (TILE, 4))
    W.nbytes = sum(a.nbytes for a in (W.qs, W.d, W.w) if a is not None)
    if qtype == "q41":
        W.nbytes += W.m.nbytes
    return W


# --- the call ----------------------------------------------------------------------------------


def matmul(W, x, out, act="q80"):
    """out (n, rows) = x (n, cols) @ W.T, x and out float32 C-contiguous.

    Block-quantized weights quantize x to Q80 first (act="q80"); act="f32" keeps x in float32
    (Q40 only: slower, used to measure what the quantized activations cost).
    Raises ValueError on mismatched shapes or types.
    """
    n = x.shape[0]
    if x.shape[1] != W.cols or out.shape[0] != n or out.shape[1] != W.rows:
        raise ValueError(f"matmul: W {W.rows}x{W.cols}, x {x.shape}, out {out.shape}")
    if x.dtype != _F32 or out.dtype != _F32:
        raise ValueError(f"matmul wants float32 x and out, got {x.dtype} and {out.dtype}")
    par = _threads.use_parallel()
    if n == 0:
        return
    if W.xq is not None:
        if act == "q80":
            if n > W.xq.shape[0]:
                W._grow(n)
            W.kernels[n > 1][par](W.qs, W.d, W.m, x, W.xq, W.xd, W.xs, out, W.fs)
        elif act == "f32" and W.qtype == "q40":
            _KERNELS["q40_f32"][par](W.qs, W.d, x, out)
        else:
            raise ValueError(f"matmul: no {W.qtype} x {act} kernel")
    elif W.qtype == "f16":
        if W.fs is None or W.fs.shape[1] <= n:   # sized for the largest batch seen
            W.fs = np.empty((numba.config.NUMBA_NUM_THREADS, n + 1, TILE), np.float32)
        W.kernels[par](W.w, x, out, W.fs)
    else:
        np.matmul(x, W.w.T, out=out)


_F32 = np.dtype(np.float32)
_NO_M = np.zeros((0, 1, TILE), np.uint16)
