"""The exchanges of tensor parallelism, behind one small interface.

The forward pass of a node calls these at its sync points and never sees a socket. `LocalCollective` is
the one-node case (nothing to exchange); the socket implementations live in `dllama.net`.
"""

from __future__ import annotations

import numpy as np


class Collective:
    """Base of every collective. `index` 0 is the root."""

    n_nodes: int = 1
    index: int = 0

    # Counters the engine reports per token: bytes on the wire and seconds spent waiting on it.
    sent_bytes: int = 0
    recv_bytes: int = 0
    transfer_s: float = 0.0

    @property
    def is_root(self) -> bool:
        return self.index == 0

    def step(self, n: int, positions: np.ndarray) -> np.ndarray | None:
        """Root: announce a forward pass over `n` positions. Worker: wait for one; returns its positions
        (None when the root is done)."""
        return positions

    def broadcast(self, x: np.ndarray) -> None:
        """Root: send x (n, dim) to every worker. Worker: receive the root's x into x."""

    def reduce_sum(self, y: np.ndarray) -> None:
        """Worker: send its partial y (n, dim). Root: add every worker's partial into y."""

    def gather(self, part: np.ndarray, out: np.ndarray) -> None:
        """Root: fill out (n, vocab) with every node's slice of columns; `part` is the root's own slice.
        Worker: send its slice."""
        out[:, : part.shape[1]] = part

    def close(self) -> None:
        pass


class LocalCollective(Collective):
    """One node: every exchange is a no-op, and `gather` is skipped by the model (part is out)."""
