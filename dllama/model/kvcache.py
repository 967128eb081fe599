"""The sequence state of one node: the K and V of every conversation slot, for this node's KV heads.

It lives apart from the weights, so several sequences share one model: slot s holds positions
0..seq_len-1 at rows s * seq_len + p of each layer's (n_slots * seq_len, kv_dim) cache, and a forward pass
tells the kernels, per row, where its slot starts (`bases`). All of it is one anonymous map: pages become
resident only as positions are written, and `release` gives a slot's pages back to the system at once.
"""

from __future__ import annotations

import mmap

import numpy as np

_PAGE = mmap.PAGESIZE


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, seq_len: int, kv_dim: int):
        self.n_layers, self.n_slots, self.seq_len, self.kv_dim = n_layers, n_slots, seq_len, kv_dim
        self._slot_bytes = seq_len * kv_dim * 4
        nbytes = max(n_layers * 2 * n_slots * self._slot_bytes, 1)
        self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._all = np.frombuffer(self._map, np.float32, n_layers * 2 * n_slots * seq_len * kv_dim)
        both = self._all.reshape(n_layers, 2, n_slots * seq_len, kv_dim)
        self.k = [both[i, 0] for i in range(n_layers)]
        self.v = [both[i, 1] for i in range(n_layers)]

    def base(self, slot: int) -> int:
        """The cache row of `slot`'s position 0."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside 0..{self.n_slots - 1}")
        return slot * self.seq_len

    def release(self, slot: int, keep: int = 0) -> None:
        """Give back the pages of `slot`'s positions from `keep` on (they read as zeros again; the kernels
        write a position before reading it). Pages shared with kept positions or another slot stay."""
        self.base(slot)
        row_bytes = self.kv_dim * 4
        for i in range(self.n_layers * 2):
            start = (i * self.n_slots + slot) * self._slot_bytes
            lo = -(-(start + keep * row_bytes) // _PAGE) * _PAGE
            hi = (start + self._slot_bytes) // _PAGE * _PAGE
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def resident_bytes(self) -> int | None:
        """Bytes of the cache now in memory (mincore of the map), None where libc has no mincore."""
        import ctypes

        try:
            mincore = ctypes.CDLL(None, use_errno=True).mincore
        except (OSError, AttributeError):
            return None
        n = len(self._map)
        pages = (n + _PAGE - 1) // _PAGE
        vec = (ctypes.c_ubyte * pages)()
        if mincore(ctypes.c_void_p(self._all.ctypes.data), ctypes.c_size_t(n), vec) != 0:
            return None
        return sum(b & 1 for b in vec) * _PAGE

    def close(self) -> None:
        self.k = self.v = []
        self._all = None
        try:
            self._map.close()
        except BufferError:   # a view is still held somewhere: the map goes when it does
            pass
