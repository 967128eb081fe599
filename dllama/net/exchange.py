"""The collectives over sockets, star topology: the root broadcasts x to every worker and sums their
partial outputs (DESIGN.md, "Data flow of one token"). Buffers are allocated once, for max_batch rows.

Root and workers call the same methods in the same order (the forward pass is written once), so each
BUFFER frame is checked against what the receiver expects: a mismatch is a protocol error, not garbage.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from dllama.net import protocol as P
from dllama.net.codec import Q80Codec
from dllama.net.liveness import ROOT_SILENCE_S, Pacer
from dllama.net.transport import Connection, ConnectionLost

try:  # the lead's interface; until it lands the socket collectives stand alone
    from dllama.model.collective import Collective
except ImportError:  # pragma: no cover
    Collective = object


class _Exchange(Collective):
    def __init__(self, index: int, n_nodes: int, dim: int, max_batch: int, vocab_cols: int, buffer_type: str):
        if buffer_type not in P.FTYPES:
            raise ValueError(f"buffer type must be one of {P.FTYPES}, got {buffer_type!r}")
        self.index, self.n_nodes = index, n_nodes
        self.dim, self.max_batch, self.buffer_type = dim, max_batch, buffer_type
        self._ftype = P.FTYPES.index(buffer_type)
        self._codec = Q80Codec(max_batch, dim) if buffer_type == "q80" else None
        self._tx = np.empty(max(P.buffer_nbytes("f32", max_batch, dim), 4), np.uint8)
        self._rx = np.empty(max(P.buffer_nbytes("f32", max_batch, max(dim, vocab_cols)), 4), np.uint8)
        self._meta = bytearray(P.BUFFER_META.size)
        self.transfer_s = 0.0
        self.pacer = Pacer()

    def _encode(self, x: np.ndarray):
        """x (n, dim) f32 as the wire payload: the array itself for f32, Q80 blocks in _tx otherwise."""
        if self._codec is None:
            return memoryview(np.ascontiguousarray(x, dtype=np.float32)).cast("B")
        return self._codec.encode(x, self._tx)

    def _send_buffer(self, conn: Connection, op: int, ftype: int, n: int, cols: int, payload) -> None:
        P.BUFFER_META.pack_into(self._meta, 0, op, ftype, n, cols)
        conn.send_frame(P.BUFFER, self._meta, payload)

    def _recv_buffer(self, conn: Connection, op: int, ftype: int, n: int, cols: int, into=None) -> np.ndarray:
        """Receive the BUFFER frame that must come next; returns its payload (into `into` if given)."""
        conn.set_timeout(self.pacer.timeout(n))
        t0 = time.perf_counter()
        head = conn.recv_header()
        if head is None:
            raise conn.lost("closed the connection")
        self.pacer.observe(time.perf_counter() - t0, n)
        t, meta, payload_len = head
        if t == P.REFUSE:
            raise conn.lost(bytes(meta).decode(errors="replace"))
        if t == P.BYE:   # a root interrupted in the middle of a forward pass (Ctrl-C) still says goodbye
            raise conn.lost("said goodbye in the middle of a forward pass")
        if t != P.BUFFER:
            raise P.ProtocolError(f"{conn.label}: expected BUFFER, got {P.TYPE_NAMES[t]}")
        got = P.parse_buffer_meta(meta)
        nbytes = P.buffer_nbytes(P.FTYPES[ftype], n, cols)
        if got != (op, ftype, n, cols) or payload_len != nbytes:
            raise P.ProtocolError(f"{conn.label}: BUFFER {got} of {payload_len} bytes, expected "
                                  f"{(op, ftype, n, cols)} of {nbytes}")
        dst = self._rx[:nbytes] if into is None else into
        conn.recv_into(dst)
        return dst

    def _decode_into(self, raw: np.ndarray, out: np.ndarray, add: bool) -> None:
        n = out.shape[0]
        if self._codec is None:
            src = raw[:n * self.dim * 4].view(np.float32).reshape(n, self.dim)
            if add:
                out += src
            else:
                out[...] = src
        elif add:
            self._codec.decode_add(raw, out)
        else:
            self._codec.decode(raw, out)


class RootCollective(_Exchange):
    """Node 0's side. `conns[i]` talks to node i + 1; `plan` is the partition (for the vocab slices)."""

    def __init__(self, conns: list[Connection], plan, dim: int, max_batch: int, buffer_type: str):
        vocab_cols = max((len(s.vocab) for s in plan), default=0)
        super().__init__(0, len(plan), dim, max_batch, vocab_cols, buffer_type)
        self.conns, self.plan = conns, plan
        self._positions = np.empty(max_batch, np.int32)
        self._step_meta = bytearray(4)
        # the pinger (liveness.Pinger) writes between passes only: these tell it when, under io_lock
        self.io_lock = threading.Lock()
        self.in_pass = False
        self.last_io = time.monotonic()
        self.lost: ConnectionLost | None = None
        self.pinger = None

    @property
    def sent_bytes(self) -> int:
        return sum(c.sent_bytes for c in self.conns)

    @property
    def recv_bytes(self) -> int:
        return sum(c.recv_bytes for c in self.conns)

    def step(self, n: int, positions: np.ndarray) -> None:
        """Tell every worker to run a forward pass over n tokens at `positions`."""
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a forward pass of {n} positions; the workers were set up for 1..{self.max_batch}")
        if self.lost is not None:
            raise self.lost
        with self.io_lock:
            self.in_pass = True
        t0 = time.perf_counter()
        pos = self._positions[:n]
        pos[...] = positions[:n]
        P.STEP_META.pack_into(self._step_meta, 0, n)
        for conn in self.conns:
            conn.send_frame(P.STEP, self._step_meta, pos)
        self.transfer_s += time.perf_counter() - t0

    def broadcast(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        payload = self._encode(x)
        for conn in self.conns:
            self._send_buffer(conn, P.OP_BROADCAST, self._ftype, x.shape[0], self.dim, payload)
        self.transfer_s += time.perf_counter() - t0

    def reduce_sum(self, y: np.ndarray) -> None:
        t0 = time.perf_counter()
        for conn in self.conns:
            raw = self._recv_buffer(conn, P.OP_REDUCE, self._ftype, y.shape[0], self.dim)
            self._decode_into(raw, y, add=True)
        self.transfer_s += time.perf_counter() - t0

    def gather(self, part: np.ndarray, out: np.ndarray) -> None:
        """out (n, vocab) <- the root's part and every worker's (n, len(vocab slice)) f32 logits."""
        t0 = time.perf_counter()
        n = out.shape[0]
        own = self.plan[0].vocab
        out[:, own.start:own.stop] = part
        for conn, node in zip(self.conns, self.plan[1:]):
            cols = len(node.vocab)
            raw = self._recv_buffer(conn, P.OP_GATHER, 0, n, cols)
            out[:, node.vocab.start:node.vocab.stop] = raw.view(np.float32).reshape(n, cols)
        self.transfer_s += time.perf_counter() - t0
        self.end_pass()

    def end_pass(self) -> None:
        """The forward pass is over: the pinger may write again. The gather, which ends every pass that
        computes logits, calls it; a pass without logits must call it itself."""
        self.last_io = time.monotonic()
        self.in_pass = False

    def close(self) -> None:
        """Say goodbye to every worker (each then frees its slice) and close the sockets."""
        if self.pinger is not None:
            self.pinger.stop()
        with self.io_lock:
            for conn in self.conns:
                try:
                    conn.set_timeout(1.0)   # a hung worker must not hold up the root's exit
                    conn.send(P.Bye())
                except ConnectionLost:
                    pass
                conn.close()
            self.conns = []


class WorkerCollective(_Exchange):
    """A worker's side: one connection, to the root."""

    def __init__(self, conn: Connection, index: int, n_nodes: int, dim: int, max_batch: int,
                 vocab_cols: int, buffer_type: str):
        super().__init__(index, n_nodes, dim, max_batch, vocab_cols, buffer_type)
        self.conn = conn
        self._positions = np.empty(max_batch, np.int32)
        self.said_bye = False   # after step() returned None: BYE (True) or a close between frames

    @property
    def sent_bytes(self) -> int:
        return self.conn.sent_bytes

    @property
    def recv_bytes(self) -> int:
        return self.conn.recv_bytes

    def step(self, n: int | None = None, positions=None):
        """Block until the root starts a forward pass: its positions (int32, a view valid until the next
        step), or None when the root said BYE or closed between frames. A root silent for ROOT_SILENCE_S
        (no STEP, no PING) is taken for dead: ConnectionLost."""
        self.conn.set_timeout(ROOT_SILENCE_S)
        while (head := self.conn.recv_header()) is not None and head[0] == P.PING and head[2] == 0:
            pass
        if head is None:
            return None
        t, meta, payload_len = head
        if t == P.BYE:
            self.said_bye = True
            return None
        if t != P.STEP or len(meta) != P.STEP_META.size:
            raise P.ProtocolError(f"{self.conn.label}: expected STEP or BYE, got {P.TYPE_NAMES[t]}")
        (n,) = P.STEP_META.unpack_from(meta)
        if not 0 < n <= self.max_batch or payload_len != 4 * n:
            raise P.ProtocolError(f"{self.conn.label}: STEP of {n} positions ({payload_len} bytes), "
                                  f"at most {self.max_batch}")
        pos = self._positions[:n]
        self.conn.recv_into(pos)
        return pos

    def broadcast(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        n = x.shape[0]
        if self._codec is None and x.flags.c_contiguous and x.dtype == np.float32:
            self._recv_buffer(self.conn, P.OP_BROADCAST, self._ftype, n, self.dim, into=x)
        else:
            raw = self._recv_buffer(self.conn, P.OP_BROADCAST, self._ftype, n, self.dim)
            self._decode_into(raw, x, add=False)
        self.transfer_s += time.perf_counter() - t0

    def reduce_sum(self, y: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._send_buffer(self.conn, P.OP_REDUCE, self._ftype, y.shape[0], self.dim, self._encode(y))
        self.transfer_s += time.perf_counter() - t0

    def gather(self, part: np.ndarray, out=None) -> None:
        t0 = time.perf_counter()
        payload = memoryview(np.ascontiguousarray(part, dtype=np.float32)).cast("B")
        self._send_buffer(self.conn, P.OP_GATHER, 0, part.shape[0], part.shape[1], payload)
        self.transfer_s += time.perf_counter() - t0
