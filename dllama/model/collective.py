"""The exchanges of tensor parallelism, behind one small interface.

The forward pass of a node calls these at its sync points and never sees a socket. `LocalCollective` is
the one-node case (nothing to exchange); the socket implementations live in `dllama.net`.
"""

from __future__ import annotations

import numpy as np

# What the root's sampler needs from the output layer, told to every node with the forward pass:
# (what, temperature, k). Nothing (a prompt batch before its last), the full logits, or each node's k best
# tokens and partial normaliser at that temperature (dllama/candidates.py). A pass with several output rows
# may instead carry a list of such tuples, one a row (LOGITS_ROWS on the wire): each row as its sampler needs.
LOGITS_NONE, LOGITS_FULL, LOGITS_TOP, LOGITS_ROWS = 0, 1, 2, 3
NO_LOGITS = (LOGITS_NONE, 0.0, 0)
FULL_LOGITS = (LOGITS_FULL, 0.0, 0)


def wants_of(sampler) -> tuple:
    """What `sampler` needs from the output layer: its own `wants()`, else the full logits."""
    return sampler.wants() if hasattr(sampler, "wants") else FULL_LOGITS


def per_row(wants: list):
    """What a pass whose output rows' samplers want `wants` (one tuple a row) asks of the output layer: the
    one row's own tuple, the full logits when every row wants them, else the list."""
    if len(wants) == 1:
        return wants[0]
    if all(w[0] == LOGITS_FULL for w in wants):
        return FULL_LOGITS
    return list(wants)


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

    def step(self, n: int, positions: np.ndarray, logits: tuple = FULL_LOGITS, slots: np.ndarray | None = None,
             out_rows: int = 1) -> np.ndarray | None:
        """Root: announce a forward pass over `n` rows at `positions` of the conversation `slots` (None:
        slot 0), whose output layer returns `logits` for the last `out_rows` rows. Worker: wait for one;
        returns its positions (None when the root is done)."""
        return positions

    def release(self, slot: int, keep: int = 0) -> None:
        """Root: tell every worker to drop `slot`'s positions from `keep` on (see KVCache.release)."""

    def broadcast(self, x: np.ndarray) -> None:
        """Root: send x (n, dim) to every worker, and keep in x what they receive (its Q80 round trip, say).
        Worker: receive the root's x into x. Once a pass, before the first layer."""

    def all_reduce(self, y: np.ndarray) -> None:
        """Every node: replace its partial y (n, dim) by the sum of every node's, the same bits on all."""

    def gather(self, part: np.ndarray, out: np.ndarray):
        """Root: fill out (n, vocab) with every node's slice of columns (`part` is the root's own) and return
        None, or return the merged top candidates (dllama.candidates.Candidates) when the step asked for
        them, or for a step of rows a list: each row's candidates or its full logits (a row of out).
        Worker: send its slice or its candidates."""
        out[:, : part.shape[1]] = part

    def close(self) -> None:
        pass


class LocalCollective(Collective):
    """One node: every exchange is a no-op, and `gather` is skipped by the model (part is out)."""
