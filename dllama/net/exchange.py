"""The collectives over sockets, star topology (DESIGN.md, "Data flow of one token"). The root broadcasts x
to every worker once a pass; then every sync point is an all-reduce of the nodes' partial outputs, after
which every node holds the same sum and adds it to its own copy of the residual stream:
- two nodes swap their partials at once, each sending before it waits, and each adds both: one one-way trip
  per sync point, where a gather and a broadcast back would cost a round trip plus the root's work between;
- three or more send theirs to the root, which adds them in node order and sends the sum back.
With Q80 buffers every node sums (or keeps) the partials as decoded from their Q80 bytes, its own included,
so the nodes' residual streams stay bit for bit the same. Buffers are allocated once, for max_batch rows.

Root and workers call the same methods in the same order (the forward pass is written once), so each
BUFFER frame is checked against what the receiver expects: a mismatch is a protocol error, not garbage.

The per-exchange path is a few system calls and no buffers: a Q80 frame is quantized behind its header in
one preallocated buffer and goes out in one `send`; a frame comes in with one `recvmsg_into`, header into
a small buffer and payload where it belongs, and is checked by comparing the header with the one expected.
The root sends to every worker before it waits for any, and receives from whichever answers first; it adds
the partial sums in node order, so a cluster's result does not depend on who was faster.
"""

from __future__ import annotations

import select
import struct
import threading
import time

import numpy as np

from dllama.model.collective import FULL_LOGITS, Collective
from dllama.net import protocol as P
from dllama.net.codec import Q80Codec
from dllama.net.liveness import ROOT_SILENCE_S, Pacer
from dllama.net.transport import Connection, ConnectionLost, spin_seconds

# header and BUFFER meta as one struct: the per-exchange path packs and compares them in one go
_HEAD = struct.Struct("<" + P.HEADER.format.lstrip("<") + P.BUFFER_META.format.lstrip("<"))


def _warm_top_k() -> None:
    """Compile (or load from numba's cache) the candidates kernel now, not within the first token."""
    from dllama.candidates import top_k

    top_k(np.zeros(2, np.float32), 1, np.empty(2, np.int32), np.empty(2, np.float32))


class _Exchange(Collective):
    def __init__(self, index: int, n_nodes: int, dim: int, max_batch: int, vocab_cols: list, buffer_type: str):
        if buffer_type not in P.FTYPES:
            raise ValueError(f"buffer type must be one of {P.FTYPES}, got {buffer_type!r}")
        self.index, self.n_nodes = index, n_nodes
        self.dim, self.max_batch, self.buffer_type = dim, max_batch, buffer_type
        self._ftype = P.FTYPES.index(buffer_type)
        self._codec = Q80Codec(max_batch, dim) if buffer_type == "q80" else None
        nbytes = P.buffer_nbytes(buffer_type, max_batch, dim)
        self._tx = np.empty(_HEAD.size + nbytes, np.uint8)
        self._tx_mv = memoryview(self._tx)
        self._tx_payload = self._tx[_HEAD.size:]
        # one receive buffer per peer: the root takes the workers' frames in whatever order they come
        # (a row's top candidates take at most 8 bytes a vocabulary entry, and 20 more; or a batch's rows
        # of logits: np.empty maps lazily, rows never received cost nothing)
        self._rx = [np.empty(max(nbytes, max_batch * (P.ROW_STATS.size + 8 * cols)), np.uint8)
                    for cols in vocab_cols]
        # a step of rows: each output row's temperature and k (0: its full slice), as on the wire
        self._row_temps = np.zeros(max_batch, "<f8")
        self._row_k = np.zeros(max_batch, "<i4")
        self._rx_mv = [memoryview(rx) for rx in self._rx]
        self._rx_head = [memoryview(bytearray(_HEAD.size)) for _ in vocab_cols]
        self._expect = bytearray(_HEAD.size)
        self.transfer_s = 0.0
        self.pacer = Pacer()
        # every receive of a pass first asks without blocking (transport.spin_seconds): the answer usually
        # comes within the spin, and a process that slept must be woken on both sides of every exchange
        self._spin = spin_seconds()
        _warm_top_k()

    def _nbytes(self, n: int) -> int:
        return n * self.dim * 4 if self._codec is None else self._codec.nbytes(n)

    def _send(self, conns, op: int, x: np.ndarray, lead=None, keep: bool = False) -> None:
        """x (n, dim) f32 to every connection in `conns`, in the buffer type: Q80 is encoded once, behind
        the header in _tx, and sent as one contiguous frame (after the buffers `lead`, if any). keep: x
        becomes what the receivers decode (Q80's round trip, made in the encoding pass; F32 is as sent)."""
        n = x.shape[0]
        nbytes = self._nbytes(n)
        _HEAD.pack_into(self._tx, 0, P.BUFFER, 0, P.BUFFER_META.size, nbytes, op, self._ftype, n, self.dim)
        if self._codec is None:
            parts = [self._tx_mv[:_HEAD.size], memoryview(np.ascontiguousarray(x, dtype=np.float32)).cast("B")]
        else:
            self._codec.encode(x, self._tx_payload, keep)
            parts = [self._tx_mv[:_HEAD.size + nbytes]]
        if lead:
            parts = lead + parts
        for conn in conns:
            if len(parts) == 1:
                conn.send_all(parts[0])
            else:
                conn.send_buffers(parts)

    def _recv(self, conn: Connection, i: int, op: int, ftype: int, n: int, cols: int, payload) -> None:
        """The BUFFER frame that must come next from `conn` (peer i): its payload into `payload`."""
        nbytes = len(payload)
        _HEAD.pack_into(self._expect, 0, P.BUFFER, 0, P.BUFFER_META.size, nbytes, op, ftype, n, cols)
        head = self._rx_head[i]
        got = conn.recv_frame_into(head, payload, self._expect)
        if got != _HEAD.size + nbytes or head != self._expect:
            _unexpected(conn, bytes(head[:got]) + bytes(payload[:max(got - _HEAD.size, 0)]),
                        (op, ftype, n, cols), nbytes)

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


def _candidates_in(rx: np.ndarray, at: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of a worker's n candidates received at byte `at`: their ids (u32) and logits (f32)."""
    return rx[at:at + 4 * n].view(np.uint32), rx[at + 4 * n:at + 8 * n].view(np.float32)


def _unexpected(conn: Connection, raw: bytes, want: tuple, nbytes: int) -> None:
    """Raise what a frame other than the expected BUFFER means: the peer's reason, its goodbye, a close,
    or a protocol error naming both frames."""
    if not raw:
        raise conn.lost("closed the connection")
    if len(raw) < P.HEADER.size:
        raise conn.lost("connection closed in the middle of a frame")
    try:
        t, meta_len, payload_len = P.parse_header(raw)
    except P.ProtocolError as exc:
        raise P.ProtocolError(f"{conn.label}: {exc}") from None
    meta = raw[P.HEADER.size:P.HEADER.size + meta_len]
    if t == P.REFUSE:
        raise conn.lost(meta.decode(errors="replace"))
    if t == P.BYE:   # a root interrupted in the middle of a forward pass (Ctrl-C) still says goodbye
        raise conn.lost("said goodbye in the middle of a forward pass")
    if t != P.BUFFER:
        raise P.ProtocolError(f"{conn.label}: expected BUFFER, got {P.TYPE_NAMES[t]}")
    got = P.parse_buffer_meta(meta) if len(meta) == P.BUFFER_META.size else meta.hex()
    if got == want and payload_len == nbytes:
        raise conn.lost("connection closed in the middle of a frame")
    raise P.ProtocolError(f"{conn.label}: BUFFER {got} of {payload_len} bytes, expected {want} of {nbytes}")


class RootCollective(_Exchange):
    """Node 0's side. `conns[i]` talks to node i + 1; `plan` is the partition (for the vocab slices)."""

    def __init__(self, conns: list[Connection], plan, dim: int, max_batch: int, buffer_type: str):
        super().__init__(0, len(plan), dim, max_batch, [len(s.vocab) for s in plan[1:]], buffer_type)
        self.conns, self.plan = conns, plan
        for conn in conns:
            conn.spin = self._spin
        self._step_frame = bytearray(P.HEADER.size + P.STEP_META.size)
        self._step_pos = np.zeros(2 * max_batch, np.int32)   # positions, then slots
        self._pending_step = None
        self._logits = FULL_LOGITS
        vocab = plan[-1].vocab.stop
        # every node's candidates, node after node, a row each (mapped lazily: a row uses k per node)
        self._top_ids = np.empty((max_batch, vocab), np.int32)
        self._top_logits = np.empty((max_batch, vocab), np.float32)
        self._fetched = False   # the full logits of this pass's rows are in (a fall-back was taken)
        self._own_scratch = np.empty(len(plan[0].vocab), np.float64)
        self.top_fallbacks = 0   # tokens whose candidates did not decide: the full logits were fetched
        self._poller = select.poll()
        # the pinger (liveness.Pinger) writes between passes only: these tell it when, under io_lock
        self.io_lock = threading.Lock()
        self.in_pass = False
        self.last_io = time.monotonic()
        self.lost: ConnectionLost | None = None
        self.pinger = None
        # each worker's own cumulative (compute, network) ns, from the TIMES frame before its gather or top:
        # received straight into these rows
        self.worker_ns = np.zeros((len(conns), 2), "<u8")
        self._times_rx = [memoryview(row).cast("B") for row in self.worker_ns]
        self._times_head = memoryview(bytearray(P.HEADER.size))
        self._times_expect = P.HEADER.pack(P.TIMES, 0, P.TIMES_META.size, 0)

    @property
    def sent_bytes(self) -> int:
        return sum(c.sent_bytes for c in self.conns)

    @property
    def recv_bytes(self) -> int:
        return sum(c.recv_bytes for c in self.conns)

    def step(self, n: int, positions: np.ndarray, logits: tuple = FULL_LOGITS, slots: np.ndarray | None = None,
             out_rows: int = 1) -> None:
        """Tell every worker to run a forward pass over n tokens at `positions` of `slots`, ending in
        `logits` of the last `out_rows` rows."""
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a forward pass of {n} positions; the workers were set up for 1..{self.max_batch}")
        if self.lost is not None:
            raise self.lost
        with self.io_lock:
            self.in_pass = True
        t0 = time.perf_counter()
        pos = self._step_pos[:2 * n]
        pos[:n] = positions[:n]
        pos[n:] = 0 if slots is None else slots[:n]
        self._logits = logits
        self._fetched = False
        if isinstance(logits, list):   # a row each: LOGITS_ROWS, their temperatures and k after the slots
            for r, (what, temperature, k) in enumerate(logits):
                top = what == P.LOGITS_TOP
                self._row_temps[r], self._row_k[r] = (temperature, k) if top else (0.0, 0)
            what, temperature, k = P.LOGITS_ROWS, 0.0, 0
            tail = [self._row_temps[:out_rows], self._row_k[:out_rows]]
        else:
            what, temperature, k = logits
            tail = []
        P.HEADER.pack_into(self._step_frame, 0, P.STEP, 0, P.STEP_META.size, P.step_nbytes(n, what, out_rows))
        P.STEP_META.pack_into(self._step_frame, P.HEADER.size, n, what, k, temperature, out_rows)
        # sent with the pass's first broadcast: one wake-up of each worker instead of two
        self._pending_step = [self._step_frame, pos] + tail
        self.transfer_s += time.perf_counter() - t0

    def _flush_step(self) -> None:
        if self._pending_step:
            for conn in self.conns:
                conn.send_buffers(self._pending_step)
            self._pending_step = None

    def release(self, slot: int, keep: int = 0) -> None:
        if self.lost is not None:
            raise self.lost
        frame = P.encode_bytes(P.Release(slot, keep))
        with self.io_lock:   # between passes, as a ping: never inside another frame
            for conn in self.conns:
                conn.send_all(frame)
            self.last_io = time.monotonic()

    def broadcast(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._send(self.conns, P.OP_BROADCAST, x, self._pending_step, keep=True)
        self._pending_step = None
        self.transfer_s += time.perf_counter() - t0

    def all_reduce(self, y: np.ndarray) -> None:
        self._flush_step()
        t0 = time.perf_counter()
        n = y.shape[0]
        nbytes = self._nbytes(n)
        if self.n_nodes == 2:
            # sent before the wait: the worker has it when it finishes, whoever finished first. A sum of two
            # floats does not depend on their order, so both nodes get the same bits.
            try:
                self._send(self.conns, P.OP_REDUCE, y, keep=True)
            except ConnectionLost:   # a worker that failed said why before it closed: that, not the pipe
                self._collect(P.OP_REDUCE, self._ftype, n, self.dim, nbytes)
                raise
            self._collect(P.OP_REDUCE, self._ftype, n, self.dim, nbytes)
            self._decode_into(self._rx[0], y, add=True)
        else:
            self._collect(P.OP_REDUCE, self._ftype, n, self.dim, nbytes)
            for rx in self._rx:   # in node order: the sum is the same whoever answered first
                self._decode_into(rx, y, add=True)
            self._send(self.conns, P.OP_SUM, y, keep=True)
        self.transfer_s += time.perf_counter() - t0

    def _collect(self, op: int, ftype: int, n: int, cols: int, nbytes: int, into=None) -> None:
        """Receive the expected frame from every worker, from whichever has sent it first. Payloads land
        in the receive buffers, or in into[i] (a byte view) when given; `cols` 0 means the node's vocab.
        Every read has the pacer's deadline (a top's n is its candidates; the pass is of one row)."""
        rows = 1 if op == P.OP_TOP else n
        timeout = self.pacer.timeout(rows)
        for conn in self.conns:
            conn.set_timeout(timeout)   # free when unchanged: the pacer's answer is stable within a pass
        t0 = time.perf_counter()
        if len(self.conns) == 1:
            self._recv_one(0, op, ftype, n, cols, nbytes, into)
        else:
            self._poll_all(op, ftype, n, cols, nbytes, into, timeout)
        self.pacer.observe(time.perf_counter() - t0, rows)

    def _poll_all(self, op: int, ftype: int, n: int, cols: int, nbytes: int, into, timeout: float) -> None:
        # from the connections as they are now (a root may have replaced a lost worker's)
        waiting = {conn.sock.fileno(): i for i, conn in enumerate(self.conns)}
        for fd in waiting:
            self._poller.register(fd, select.POLLIN)
        try:
            deadline, spin_until = time.monotonic() + timeout, time.perf_counter() + self._spin
            while waiting:
                ready = self._poller.poll(0) if self._spin else None   # no spin: straight to the blocking poll
                if not ready and time.perf_counter() < spin_until:
                    continue
                if not ready:
                    ready = self._poller.poll(max(deadline - time.monotonic(), 0.0) * 1000)
                if not ready:
                    late = [self.conns[i].label for i in waiting.values()]
                    raise ConnectionLost(f"{', '.join(late)}: no data within {timeout:g} s (frozen or gone?)",
                                         late[0])
                for fd, _ in ready:
                    i = waiting.pop(fd, None)
                    if i is not None:
                        self._poller.unregister(fd)
                        self._recv_one(i, op, ftype, n, cols, nbytes, into)
        finally:
            for fd in waiting:
                self._poller.unregister(fd)

    def _recv_one(self, i: int, op: int, ftype: int, n: int, cols: int, nbytes: int, into) -> None:
        if cols == 0:   # sized by the node's vocabulary slice: its logits, or its top n
            cols = len(self.plan[i + 1].vocab)
            if op == P.OP_TOP:
                n = min(n, cols)
                nbytes = P.TOP_STATS.size + 8 * n
            elif op == P.OP_ROWS:
                nbytes = P.rows_nbytes(self._row_k[:n], cols)
            else:
                nbytes = 4 * n * cols
        payload = self._rx_mv[i][:nbytes] if into is None else into[i]
        if op == P.OP_GATHER or op == P.OP_TOP or op == P.OP_ROWS:
            self._recv_times(i, (op, ftype, n, cols), nbytes)
        self._recv(self.conns[i], i, op, ftype, n, cols, payload)

    def _recv_times(self, i: int, want: tuple, nbytes: int) -> None:
        """The TIMES frame that comes before a worker's gather or top, its counters into worker_ns[i]."""
        conn, head, counters = self.conns[i], self._times_head, self._times_rx[i]
        got = conn.recv_frame_into(head, counters, self._times_expect)
        if got == P.HEADER.size + P.TIMES_META.size and head == self._times_expect:
            return
        raw = bytes(head[:got]) + bytes(counters[:max(got - P.HEADER.size, 0)])
        if got >= P.HEADER.size and raw[0] == P.BUFFER:
            kind = {P.OP_TOP: "top", P.OP_ROWS: "rows"}.get(want[0], "gather")
            raise P.ProtocolError(f"{conn.label}: a {kind} BUFFER without the TIMES that comes before it")
        if got >= P.HEADER.size and raw[0] == P.REFUSE:   # the worker's reason, whole
            rest = bytearray(max(P.HEADER.size + P.HEADER.unpack_from(raw)[2] - len(raw), 0))
            conn.recv_into(rest)
            raw += rest
        _unexpected(conn, raw, want, nbytes)

    def gather(self, part: np.ndarray, out: np.ndarray):
        """out (n, vocab) <- the root's part and every worker's (n, len(vocab slice)) f32 logits; or, when
        the step asked for the top candidates, those of every node (dllama.candidates.Candidates); or, for
        a step of rows, a list: each row's candidates, or its row of out where it asked for the logits."""
        self._flush_step()
        if isinstance(self._logits, list):
            top = self._gather_rows(part, out)
        elif self._logits[0] == P.LOGITS_TOP:
            top = self._gather_top(part, out)
        else:
            top = self._gather_full(part, out)
        self.end_pass()
        return top

    def _gather_full(self, part: np.ndarray, out: np.ndarray) -> None:
        t0 = time.perf_counter()
        n = out.shape[0]
        own = self.plan[0].vocab
        out[:, own.start:own.stop] = part
        if n == 1:   # a row's slice is contiguous: the workers' logits land in place
            views = [memoryview(out[0, s.vocab.start:s.vocab.stop]).cast("B") for s in self.plan[1:]]
            self._collect(P.OP_GATHER, 0, n, 0, 0, views)
        else:
            self._collect(P.OP_GATHER, 0, n, 0, 0)
            for rx, node in zip(self._rx, self.plan[1:]):
                cols = len(node.vocab)
                out[:, node.vocab.start:node.vocab.stop] = rx[:4 * n * cols].view(np.float32).reshape(n, cols)
        self.transfer_s += time.perf_counter() - t0

    def end_pass(self) -> None:
        """The forward pass is over: the pinger may write again. The gather, which ends every pass that
        computes logits, calls it; a pass without logits must call it itself."""
        self.last_io = time.monotonic()
        self.in_pass = False

    def _gather_top(self, part: np.ndarray, out: np.ndarray):
        t0 = time.perf_counter()
        _, temperature, k = self._logits
        own = self._own_candidates(part, 0, k, temperature)   # while the workers pick theirs
        self._collect(P.OP_TOP, 0, k, 0, 0)
        peers = []
        for rx, node in zip(self._rx, self.plan[1:]):
            got = min(k, len(node.vocab))
            peers.append((*P.TOP_STATS.unpack_from(rx), *_candidates_in(rx, P.TOP_STATS.size, got)))
        top = self._merge(part, out, 0, k, temperature, own, peers)
        self.transfer_s += time.perf_counter() - t0
        return top

    def _gather_rows(self, part: np.ndarray, out: np.ndarray) -> list:
        """A step of rows: every worker's one OP_ROWS frame, parsed row after row into each row's candidates
        (a top row) or its full logits in out (a row that asked for them)."""
        t0 = time.perf_counter()
        rows = out.shape[0]
        temps, ks = self._row_temps[:rows], self._row_k[:rows]
        # the root's own candidates while the workers pick theirs
        mine = [self._own_candidates(part, r, int(ks[r]), float(temps[r])) if ks[r] else None for r in range(rows)]
        self._collect(P.OP_ROWS, 0, rows, 0, 0)
        own = self.plan[0].vocab
        at = [P.ROW_STATS.size * rows] * len(self._rx)   # each worker's next row in its frame
        result = []
        for r in range(rows):
            k = int(ks[r])
            if not k:
                out[r, own.start:own.stop] = part[r]
            peers = []
            for i, (rx, node) in enumerate(zip(self._rx, self.plan[1:])):
                m, s, got = P.ROW_STATS.unpack_from(rx, P.ROW_STATS.size * r)
                cols, a = len(node.vocab), at[i]
                if got != (min(k, cols) if k else 0):
                    raise P.ProtocolError(f"{self.conns[i].label}: row {r} carries {got} candidates, asked {k}")
                if k:
                    peers.append((m, s, *_candidates_in(rx, a, got)))
                    at[i] = a + 8 * got
                else:
                    out[r, node.vocab.start:node.vocab.stop] = rx[a:a + 4 * cols].view(np.float32)
                    at[i] = a + 4 * cols
            result.append(self._merge(part, out, r, k, float(temps[r]), mine[r], peers) if k else out[r])
        self.transfer_s += time.perf_counter() - t0
        return result

    def _own_candidates(self, part: np.ndarray, r: int, k: int, temperature: float) -> tuple:
        """The root's k best of part[r], at the start of row r's candidates: (how many, m, s)."""
        from dllama.candidates import node_candidates

        return node_candidates(part[r], self.plan[0].vocab.start, k, temperature, self._top_ids[r],
                               self._top_logits[r], self._own_scratch)

    def _merge(self, part: np.ndarray, out: np.ndarray, r: int, k: int, temperature: float, own: tuple,
               peers: list):
        """Row r's candidates: the root's own (`_own_candidates`), then each worker's (m, s, ids, logits)
        in node order (dllama.candidates.Candidates)."""
        from dllama.candidates import Candidates

        ids, vals = self._top_ids[r], self._top_logits[r]
        m, s = np.zeros(self.n_nodes), np.zeros(self.n_nodes)
        at, m[0], s[0] = own
        # every token a node did not send is at most its last one sent
        floor = vals[at - 1] if len(self.plan[0].vocab) > k else -np.inf
        for i, (peer, node) in enumerate(zip(peers, self.plan[1:]), start=1):
            m[i], s[i], got_ids, got_vals = peer
            got = got_ids.size
            ids[at:at + got] = got_ids
            vals[at:at + got] = got_vals
            if len(node.vocab) > k:
                floor = max(floor, vals[at + got - 1])
            at += got
        return Candidates(ids[:at], vals[:at], m, s, float(floor), temperature, out.shape[1],
                          lambda: self._fetch_full(part, out)[r])

    def _fetch_full(self, part: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The fall-back of a top step: every worker sends the slice of the logits it has just computed, of
        every output row (one round trip serves every row of the pass that needs it). It runs after the
        pass ended, so the pinger is kept off the sockets as during a pass."""
        if self._fetched:
            return out
        if self.lost is not None:
            raise self.lost
        with self.io_lock:   # a ping being written finishes first: no frame lands inside it
            self.in_pass = True
        t0 = time.perf_counter()
        self.top_fallbacks += 1
        _HEAD.pack_into(self._tx, 0, P.BUFFER, 0, P.BUFFER_META.size, 0, P.OP_FULL, 0, 0, 0)
        request = self._tx_mv[:_HEAD.size]
        for conn in self.conns:
            conn.send_all(request)
        self.transfer_s += time.perf_counter() - t0
        self._gather_full(part, out)
        self._fetched = True
        self.end_pass()
        return out

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
                 vocab_cols: int, buffer_type: str, vocab_start: int = 0):
        super().__init__(index, n_nodes, dim, max_batch, [0], buffer_type)
        self.conn = conn
        conn.spin = self._spin
        self._conns = [conn]
        self._positions = np.empty(2 * max_batch, np.int32)   # positions, then slots
        self.slots = self._positions[:0]   # the slot of each row of the pass step() announced
        self.out_rows = 1
        self.on_release = None   # on_release(slot, keep): a RELEASE from the root (the model's KVCache.release)
        self.said_bye = False   # after step() returned None: BYE (True) or a close between frames
        self._logits = FULL_LOGITS
        self._vocab_start = vocab_start
        self._last_part = None  # the logits of the last pass, until a top step's root has decided
        # a row each for a step of rows (mapped lazily: a row uses its k entries)
        self._top_ids = np.empty((max_batch, max(vocab_cols, 1)), np.int32)
        self._top_logits = np.empty((max_batch, max(vocab_cols, 1)), np.float32)
        self._top_stats = bytearray(_HEAD.size + max(P.TOP_STATS.size, max_batch * P.ROW_STATS.size))
        self._top_stats_mv = memoryview(self._top_stats)
        self._scratch = np.empty(vocab_cols, np.float64)
        # this worker's own clock, reported in TIMES (protocol.py): the exchanges' time is transfer_s, which
        # they already keep; the passes' is taken once as each starts and ends. Kept in float seconds as the
        # exchanges' is (an int of nanoseconds costs ~45 ns more per exchange), turned into ns per report.
        self._busy_s = 0.0     # inside the passes before the current one, from STEP to the next step()
        self._pass_t0 = 0.0    # when the current pass's STEP arrived (0: none open)
        self._times = bytearray(P.HEADER.size + P.TIMES_META.size)
        P.HEADER.pack_into(self._times, 0, P.TIMES, 0, P.TIMES_META.size, 0)

    @property
    def compute_s(self) -> float:
        """Time inside the finished forward passes outside the exchanges."""
        return self._busy_s - self.transfer_s

    def _stamp(self, now: float) -> bytearray:
        """The TIMES frame for a report at `now` (within the current pass, before its gather)."""
        compute = self._busy_s + (now - self._pass_t0 if self._pass_t0 else 0.0) - self.transfer_s
        P.TIMES_META.pack_into(self._times, P.HEADER.size, int(max(compute, 0.0) * 1e9), int(self.transfer_s * 1e9))
        return self._times

    @property
    def sent_bytes(self) -> int:
        return self.conn.sent_bytes

    @property
    def recv_bytes(self) -> int:
        return self.conn.recv_bytes

    @property
    def wants_logits(self) -> bool:
        """Whether the forward pass the last step() announced ends in the output layer."""
        return self._logits[0] != P.LOGITS_NONE

    def step(self, n: int | None = None, positions=None, logits=None):
        """Block until the root starts a forward pass: its positions (int32, a view valid until the next
        step), or None when the root said BYE or closed between frames. A root silent for ROOT_SILENCE_S
        (no STEP, no PING) is taken for dead: ConnectionLost. A root that could not sample from the
        candidates of the last pass is sent that pass's full slice of logits meanwhile."""
        if self._pass_t0:   # the pass before ends here
            self._busy_s += time.perf_counter() - self._pass_t0
            self._pass_t0 = 0.0
        while True:
            self.conn.set_timeout(ROOT_SILENCE_S)
            self.conn.spin_readable()   # within a generation the next STEP follows at once
            head = self.conn.recv_header()
            if head is None:
                return None
            t, meta, payload_len = head
            if t == P.PING and payload_len == 0:
                continue
            if t == P.BYE:
                self.said_bye = True
                return None
            if t == P.BUFFER and payload_len == 0 and P.parse_buffer_meta(meta) == (P.OP_FULL, 0, 0, 0):
                self._send_full()
                continue
            if t == P.RELEASE and payload_len == 0 and len(meta) == P.RELEASE_META.size:
                if self.on_release is not None:
                    try:
                        self.on_release(*P.RELEASE_META.unpack(meta))
                    except ValueError as exc:
                        raise P.ProtocolError(f"{self.conn.label}: RELEASE {exc}") from None
                continue
            if t != P.STEP or len(meta) != P.STEP_META.size:
                raise P.ProtocolError(f"{self.conn.label}: expected STEP or BYE, got {P.TYPE_NAMES[t]}")
            n, what, k, temperature, out_rows = P.STEP_META.unpack_from(meta)
            if not 0 < n <= self.max_batch or payload_len < 8 * n:
                raise P.ProtocolError(f"{self.conn.label}: STEP of {n} positions ({payload_len} bytes), "
                                      f"at most {self.max_batch}")
            P.check_step(n, what, k, temperature, out_rows)
            if payload_len != P.step_nbytes(n, what, out_rows):
                raise P.ProtocolError(f"{self.conn.label}: STEP of {n} positions ({payload_len} bytes), "
                                      f"{out_rows} rows of logits {what}")
            self._logits = (what, temperature, k)
            self.out_rows = out_rows
            rows = self._positions[:2 * n]
            self.conn.recv_into(rows)
            if what == P.LOGITS_ROWS:
                self.conn.recv_into(self._row_temps[:out_rows])
                self.conn.recv_into(self._row_k[:out_rows])
                P.check_rows(self._row_temps[:out_rows], self._row_k[:out_rows])
            self.slots = rows[n:]
            self._pass_t0 = time.perf_counter()
            return rows[:n]

    def broadcast(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        n = x.shape[0]
        nbytes = self._nbytes(n)
        self.conn.set_timeout(self.pacer.timeout(n))
        if self._codec is None and x.flags.c_contiguous and x.dtype == np.float32:
            self._recv(self.conn, 0, P.OP_BROADCAST, self._ftype, n, self.dim, memoryview(x).cast("B"))
        else:
            self._recv(self.conn, 0, P.OP_BROADCAST, self._ftype, n, self.dim, self._rx_mv[0][:nbytes])
            self.pacer.observe(time.perf_counter() - t0, n)
            self._decode_into(self._rx[0], x, add=False)
            self.transfer_s += time.perf_counter() - t0
            return
        self.pacer.observe(time.perf_counter() - t0, n)
        self.transfer_s += time.perf_counter() - t0

    def all_reduce(self, y: np.ndarray) -> None:
        t0 = time.perf_counter()
        n = y.shape[0]
        nbytes = self._nbytes(n)
        self._send(self._conns, P.OP_REDUCE, y, keep=self.n_nodes == 2)
        self.conn.set_timeout(self.pacer.timeout(n))
        t1 = time.perf_counter()
        if self.n_nodes == 2:   # the root's partial, sent as ours was (RootCollective.all_reduce)
            self._recv(self.conn, 0, P.OP_REDUCE, self._ftype, n, self.dim, self._rx_mv[0][:nbytes])
            self.pacer.observe(time.perf_counter() - t1, n)
            self._decode_into(self._rx[0], y, add=True)
        elif self._codec is None and y.flags.c_contiguous and y.dtype == np.float32:
            self._recv(self.conn, 0, P.OP_SUM, self._ftype, n, self.dim, memoryview(y).cast("B"))
            self.pacer.observe(time.perf_counter() - t1, n)
        else:
            self._recv(self.conn, 0, P.OP_SUM, self._ftype, n, self.dim, self._rx_mv[0][:nbytes])
            self.pacer.observe(time.perf_counter() - t1, n)
            self._decode_into(self._rx[0], y, add=False)
        self.transfer_s += time.perf_counter() - t0

    def gather(self, part: np.ndarray, out=None) -> None:
        t0 = time.perf_counter()
        self._last_part = part
        times = self._stamp(t0)
        if self._logits[0] == P.LOGITS_TOP:
            self._send_top(part[0], times)
        elif self._logits[0] == P.LOGITS_ROWS:
            self._send_rows(part, times)
        else:
            self._send_full(times)
        self.transfer_s += time.perf_counter() - t0

    def _send_full(self, times=None) -> None:
        part = self._last_part
        if part is None:
            raise P.ProtocolError(f"{self.conn.label}: asked for logits before any forward pass")
        payload = memoryview(np.ascontiguousarray(part, dtype=np.float32)).cast("B")
        _HEAD.pack_into(self._tx, 0, P.BUFFER, 0, P.BUFFER_META.size, len(payload), P.OP_GATHER, 0,
                        part.shape[0], part.shape[1])
        if times is None:   # every gather has its TIMES ahead: between passes (after a top), as they stand
            times = self._stamp(time.perf_counter())
        self.conn.send_buffers([times, self._tx_mv[:_HEAD.size], payload])

    def _send_top(self, logits: np.ndarray, times) -> None:
        from dllama.candidates import node_candidates

        _, temperature, k = self._logits
        ids, vals = self._top_ids[0], self._top_logits[0]
        n, m, s = node_candidates(logits, self._vocab_start, k, temperature, ids, vals, self._scratch)
        _HEAD.pack_into(self._top_stats, 0, P.BUFFER, 0, P.BUFFER_META.size, P.TOP_STATS.size + 8 * n, P.OP_TOP,
                        0, n, logits.size)
        P.TOP_STATS.pack_into(self._top_stats, _HEAD.size, m, s)
        self.conn.send_buffers([times, self._top_stats_mv[:_HEAD.size + P.TOP_STATS.size], ids[:n], vals[:n]])

    def _send_rows(self, part: np.ndarray, times) -> None:
        """A step of rows: one OP_ROWS frame, each row's stats first, then row after row its candidates or
        its slice of the logits (sent from where they lie, no copy)."""
        from dllama.candidates import node_candidates

        rows, cols = part.shape
        bufs, size = [times, self._top_stats_mv[:_HEAD.size + rows * P.ROW_STATS.size]], rows * P.ROW_STATS.size
        for r in range(rows):
            k = int(self._row_k[r])
            if k:
                ids, vals = self._top_ids[r], self._top_logits[r]
                n, m, s = node_candidates(part[r], self._vocab_start, k, float(self._row_temps[r]), ids, vals,
                                          self._scratch)
                bufs += [ids[:n], vals[:n]]
                size += 8 * n
            else:
                n, m, s = 0, 0.0, 0.0
                bufs.append(part[r])
                size += 4 * cols
            P.ROW_STATS.pack_into(self._top_stats, _HEAD.size + r * P.ROW_STATS.size, m, s, n)
        _HEAD.pack_into(self._top_stats, 0, P.BUFFER, 0, P.BUFFER_META.size, size, P.OP_ROWS, 0, rows, cols)
        self.conn.send_buffers(bufs)
