"""Framed sockets and the socket collectives, root and worker in one process over socket pairs."""

import socket
import threading
import time

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from dllama.model.partition import NodeSlice
from dllama.net import protocol as P
from dllama.net.exchange import RootCollective, WorkerCollective
from dllama.net.liveness import Pacer
from dllama.net.transport import Connection, ConnectionLost


def _pair(label="peer"):
    a, b = socket.socketpair()
    return Connection(a, f"{label} a", 5.0), Connection(b, f"{label} b", 5.0)


def test_frames_clean_close_and_close_mid_frame():
    a, b = _pair()
    payload = np.arange(6, dtype=np.float32)
    P.BUFFER_META.pack_into(meta := bytearray(P.BUFFER_META.size), 0, P.OP_REDUCE, 0, 2, 3)
    a.send_frame(P.BUFFER, meta, payload)
    t, m, n = b.recv_header()
    assert (t, P.parse_buffer_meta(m), n) == (P.BUFFER, (P.OP_REDUCE, 0, 2, 3), 24)
    got = np.empty(6, np.float32)
    b.recv_into(got)
    assert np.array_equal(got, payload) and a.sent_bytes == b.recv_bytes == 8 + 10 + 24
    a.send_buffers([P.encode_bytes(P.Ready())[:5]])
    a.close()
    with pytest.raises(ConnectionLost, match="middle of a frame"):
        b.recv_header()
    c, d = _pair()
    c.send(P.Bye())
    c.close()
    assert isinstance(d.recv(), P.Bye) and d.recv() is None   # a close between frames is not an error


def test_recv_timeout_names_the_peer():
    a, b = _pair("worker 10.0.0.9:9998")
    b.set_timeout(0.2)
    with pytest.raises(ConnectionLost, match="worker 10.0.0.9:9998 b: no data within 0.2 s"):
        b.recv_header()


def test_handshake_deadline_bounds_all_reads_with_kernel_timeouts():
    """A peer that sends part of a frame and stalls is cut off at the deadline, not per read; the reads under
    it leave the socket blocking (the per-exchange path then needs no Python timeout mode undone)."""
    a, b = _pair("worker 127.0.0.1:9")
    frame = P.encode_bytes(P.Bye())
    b.deadline = time.monotonic() + 0.3
    a.sock.sendall(frame[:3])
    with pytest.raises(ConnectionLost, match="^worker 127.0.0.1:9 b: too slow: the handshake has a deadline"):
        b.recv_header()
    assert b.sock.gettimeout() is None and 0 < b.timeout <= 0.3


def _plan(n_nodes, dim, vocab):
    step = vocab // n_nodes
    return [NodeSlice(i, n_nodes, range(0), range(0), range(0), range(i * step, (i + 1) * step))
            for i in range(n_nodes)]


@pytest.mark.parametrize("ftype", ["f32", "q80"])
def test_collectives_star(ftype):
    """Root broadcasts x, every worker's partial is (index + 1) * x: after the all-reduce every node holds
    their sum (the root's partial is x), the same bits on all three."""
    dim, vocab, n_nodes, n = 64, 96, 3, 4
    plan = _plan(n_nodes, dim, vocab)
    pairs = [_pair(f"worker {i}") for i in range(1, n_nodes)]
    root = RootCollective([p[0] for p in pairs], plan, dim, 8, ftype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    logits_parts = [rng.normal(size=(1, 32)).astype(np.float32) for _ in range(n_nodes)]
    seen = {}

    def worker(i, conn):
        coll = WorkerCollective(conn, i, n_nodes, dim, 8, 32, ftype)
        pos = coll.step()
        xw = np.zeros((len(pos), dim), np.float32)
        coll.broadcast(xw)
        seen[i] = (pos.copy(), xw.copy())
        time.sleep(0.02 * i)   # the worker's own computation, as its TIMES must report it
        yw = (i + 1) * xw
        coll.all_reduce(yw)
        coll.gather(logits_parts[i], None)
        seen[i] += (coll.transfer_s, yw)
        assert coll.step() is None   # BYE

    threads = [threading.Thread(target=worker, args=(i, p[1])) for i, p in enumerate(pairs, start=1)]
    for t in threads:
        t.start()
    root.step(n, np.arange(10, 10 + n))
    x_root = x.copy()
    root.broadcast(x_root)
    y = x_root.copy()
    root.all_reduce(y)
    logits = np.zeros((1, vocab), np.float32)
    root.gather(logits_parts[0], logits)
    sent, recv = root.sent_bytes, root.recv_bytes
    root.close()
    for t in threads:
        t.join(5)
    xq = x if ftype == "f32" else dequantize(quantize(x, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(x_root, xq)   # the root goes on from what its workers received
    for i in (1, 2):
        assert np.array_equal(seen[i][0], np.arange(10, 10 + n)) and np.array_equal(seen[i][1], xq)
        assert np.array_equal(seen[i][3], y)
    if ftype == "f32":
        np.testing.assert_allclose(y, xq + 2 * xq + 3 * xq, rtol=1e-6)
    else:   # a Q80 block is within half a step (amax/254) of each value, per hop: the partials', the sum's
        step = np.abs(xq).reshape(n, -1, 32).max(axis=2, keepdims=True) / 127
        err = np.abs(y - 6 * xq).reshape(n, -1, 32)
        assert np.all(err <= (0.5 * (2 + 3) + 0.5 * 6) * step * 1.01 + 1e-6)
    assert np.array_equal(logits, np.concatenate(logits_parts, axis=1))
    # each worker's own figures, as of its gather: its sleep is compute, its waits and sends network
    for i in (1, 2):
        compute, network = (int(v) for v in root.worker_ns[i - 1])
        assert 0.02 * i * 1e9 <= compute < 10e9 and 0 < network <= seen[i][2] * 1e9
    # bytes on the wire: what the spec says (8-byte header + 10-byte meta per buffer, TIMES before a gather)
    xbytes = P.buffer_nbytes(ftype, n, dim)
    assert sent == 2 * ((8 + P.STEP_META.size + 8 * n) + 2 * (8 + 10 + xbytes))   # positions and slots
    assert recv == 2 * ((8 + 10 + xbytes) + (8 + P.TIMES_META.size) + (8 + 10 + 32 * 4))


@pytest.mark.parametrize("ftype", ["f32", "q80"])
def test_two_nodes_swap_partials_and_both_hold_the_same_sum(ftype):
    """With two nodes each sends its partial before it waits: the worker answers a root whose partial came
    first, and the root one whose partial is already there; both end with the same bits, the sum of the
    partials as decoded from the wire (Q80: each within half a step of its value)."""
    dim, n = 64, 3
    a, b = _pair("worker 1")
    root = RootCollective([a], _plan(2, dim, 64), dim, 4, ftype)
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, dim)).astype(np.float32) for _ in range(2)]
    got, errors = {}, []

    def worker(delay):
        try:
            coll = WorkerCollective(b, 1, 2, dim, 4, 32, ftype)
            for _ in range(2):
                time.sleep(delay)
                y = parts[1].copy()
                coll.all_reduce(y)
                got.setdefault(delay, []).append(y)
        except Exception as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    for delay in (0.0, 0.03):   # the worker first, then the root first
        t = threading.Thread(target=worker, args=(delay,))
        t.start()
        for _ in range(2):
            y = parts[0].copy()
            root.all_reduce(y)
        t.join(5)
        assert not errors
        assert all(np.array_equal(w, y) for w in got[delay])
    qt = gguf.GGMLQuantizationType.Q8_0
    sent = parts if ftype == "f32" else [dequantize(quantize(p, qt), qt) for p in parts]
    assert np.array_equal(y, sent[0] + sent[1])
    if ftype == "q80":
        step = np.abs(parts[0]).reshape(n, -1, 32).max(axis=2) / 127 + np.abs(parts[1]).reshape(n, -1, 32).max(axis=2) / 127
        err = np.abs(y - parts[0] - parts[1]).reshape(n, -1, 32).max(axis=2)
        assert np.all(err <= 0.5 * step * 1.01 + 1e-6)
    root.close()


def test_root_names_the_worker_that_went_away():
    plan = _plan(2, 32, 64)
    a, b = _pair("worker 127.0.0.1:9")
    root = RootCollective([a], plan, 32, 1, "f32")
    b.close()
    with pytest.raises(ConnectionLost, match="worker 127.0.0.1:9 a"):
        root.all_reduce(np.zeros((1, 32), np.float32))


@pytest.mark.parametrize("given,want", [
    ("10.0.0.2:9998", ("10.0.0.2", 9998)), ("pi4", ("pi4", 9998)), ("[::1]:9999", ("::1", 9999)),
    (("[::1]", 9999), ("::1", 9999)), (("10.0.0.3", "9997"), ("10.0.0.3", 9997)),
])
def test_worker_addresses(given, want):
    from dllama.net.root import parse_address

    assert parse_address(given) == want


@pytest.mark.parametrize("bad", ["10.0.0.2:", ":9998", "10.0.0.2:99999", "10.0.0.2:port"])
def test_bad_worker_address_is_named(bad):
    from dllama.errors import DllamaError
    from dllama.net.root import parse_address

    with pytest.raises(DllamaError, match=f"bad worker address {bad!r}"):
        parse_address(bad)


def test_root_takes_whichever_worker_answers_first_and_sums_in_node_order():
    """Worker 2 sends a frame bigger than its socket buffer and worker 1 sends only once worker 2's send
    has gone through: a root that waited on worker 1 first would deadlock (and time out)."""
    dim, n = 4096, 8                       # 128 KiB of f32 per frame
    plan = _plan(3, dim, 96)
    pairs = []
    for i in (1, 2):
        a, b = socket.socketpair()
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pairs.append((Connection(a, f"worker {i}", 3.0), Connection(b, f"root of {i}", 3.0)))
    root = RootCollective([p[0] for p in pairs], plan, dim, n, "f32")
    rng = np.random.default_rng(5)
    parts = {i: rng.normal(size=(n, dim)).astype(np.float32) for i in (1, 2)}
    errors, sums = [], {}

    def worker(i, conn):
        try:
            coll = WorkerCollective(conn, i, 3, dim, n, 32, "f32")
            if i == 1:   # only once worker 2's whole frame went through (it then waits for the sum)
                deadline = time.monotonic() + 3.0
                while pairs[1][1].sent_bytes < 18 + parts[2].nbytes:
                    assert time.monotonic() < deadline, "worker 2's frame was never taken"
                    time.sleep(0.001)
            coll.all_reduce(parts[i])
            sums[i] = parts[i]
        except Exception as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, p[1])) for i, p in zip((1, 2), pairs)]
    for t in threads:
        t.start()
    y = rng.normal(size=(n, dim)).astype(np.float32)
    want = (y + parts[1]) + parts[2]
    root.all_reduce(y)
    for t in threads:
        t.join(5)
    assert not errors
    assert np.array_equal(y, want)   # the same float sum as node order, not arrival order
    assert all(np.array_equal(sums[i], want) for i in (1, 2))


@pytest.mark.parametrize("frame,error,match", [
    (P.Refuse("worker 127.0.0.1:7: out of memory"), ConnectionLost, "w a: worker 127.0.0.1:7: out of memory"),
    (P.Bye(), ConnectionLost, "said goodbye"),
    (P.Buffer(P.OP_GATHER, "q80", 1, 64), P.ProtocolError,
     r"BUFFER \(3, 1, 1, 64\) of 68 bytes, expected \(2, 1, 1, 64\)"),
    (P.Ready(), P.ProtocolError, "expected BUFFER, got READY"),
])
def test_root_names_what_came_instead_of_a_partial_sum(frame, error, match):
    plan = _plan(2, 64, 64)
    a, b = _pair("w")
    root = RootCollective([a], plan, 64, 1, "q80")
    if isinstance(frame, P.Buffer):
        frame.payload = bytes(68)
    b.send(frame)
    b.close()
    with pytest.raises(error, match=match):   # the root's own partial cannot go out: what came is named
        root.all_reduce(np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("n_workers", [1, 2])
def test_a_silent_worker_times_out_naming_it(n_workers):
    """One worker answers, the other says nothing: the root gives up after the pacer's deadline, naming
    the silent one (with one worker the kernel's receive timeout, with several the root's poll)."""
    plan = _plan(n_workers + 1, 32, 96)
    pairs = [_pair(f"worker {i}") for i in range(1, n_workers + 1)]
    root = RootCollective([p[0] for p in pairs], plan, 32, 1, "f32")
    root.pacer = Pacer(first=0.3)   # nothing measured yet: the first deadline
    if n_workers == 2:
        pairs[0][1].send(P.Buffer(P.OP_REDUCE, "f32", 1, 32, np.ones(32, "<f4").tobytes()))
    silent = pairs[-1][0].label
    with pytest.raises(ConnectionLost, match=f"^{silent}: no data within 0.3 s \\(frozen or gone\\?\\)") as lost:
        root.all_reduce(np.zeros((1, 32), np.float32))
    assert lost.value.peer == silent
    assert all(a.timeout == 0.3 for a, _ in pairs)   # the deadline is the sockets' kernel timeout


@pytest.mark.parametrize("frame,error,match", [
    # a worker that fails at the end of a pass: its whole reason (longer than a TIMES frame) is named
    (P.Refuse("worker 127.0.0.1:7: out of memory in the output layer"), ConnectionLost,
     "w a: worker 127.0.0.1:7: out of memory in the output layer$"),
    # the logits without the worker's TIMES ahead of them (a protocol 4 worker's gather)
    (P.Buffer(P.OP_GATHER, "f32", 1, 32, bytes(128)), P.ProtocolError, "gather BUFFER without the TIMES"),
])
def test_root_names_what_came_instead_of_a_workers_times(frame, error, match):
    plan = _plan(2, 64, 64)
    a, b = _pair("w")
    root = RootCollective([a], plan, 64, 1, "f32")
    root.step(1, np.array([0]))
    b.send(frame)
    with pytest.raises(error, match=match):
        root.gather(np.zeros((1, 32), np.float32), np.zeros((1, 64), np.float32))


class _Recording:
    """A socket that records the flags of every receive it is asked for."""

    def __init__(self, sock):
        self._sock, self.flags = sock, []

    def recvmsg_into(self, bufs, ancbufsize=0, flags=0):
        self.flags.append(flags)
        return self._sock.recvmsg_into(bufs, ancbufsize, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("spin_s,blocks", [(0.0, True), (5.0, False)])
def test_an_exchange_receive_asks_without_blocking_for_the_spin_then_blocks(spin_s, blocks):
    """A frame that comes 20 ms after the receive began: within a long spin every read is a non-blocking
    one (the process never sleeps), with no spin the read blocks; the frame arrives whole either way."""
    a, b = _pair("worker 1")
    b.sock = rec = _Recording(b.sock)
    b.spin = spin_s
    frame = np.arange(40, dtype=np.uint8)
    threading.Timer(0.02, lambda: a.send_all(memoryview(frame))).start()
    head, payload = memoryview(bytearray(8)), memoryview(bytearray(32))
    assert b.recv_frame_into(head, payload, bytes(frame[:8])) == 40
    assert bytes(head) + bytes(payload) == frame.tobytes()
    assert (0 in rec.flags) == blocks
    assert all(f == socket.MSG_DONTWAIT for f in rec.flags[:-1])


@pytest.mark.parametrize("spin_s,polls_blocking", [(0.0, True), (5.0, False)])
def test_the_root_waits_on_several_workers_by_polling_within_the_spin(spin_s, polls_blocking, monkeypatch):
    monkeypatch.setenv("DLLAMA_SPIN_US", str(int(spin_s * 1e6)))
    plan = _plan(3, 32, 96)
    pairs = [_pair(f"worker {i}") for i in (1, 2)]
    root = RootCollective([p[0] for p in pairs], plan, 32, 1, "f32")
    assert all(p[0].spin == spin_s for p in pairs)
    timeouts = []

    class Poller:   # select.poll's interface, recording each poll's timeout
        def __init__(self, real):
            self._real = real

        def poll(self, timeout=None):
            timeouts.append(timeout)
            return self._real.poll(timeout)

        def __getattr__(self, name):
            return getattr(self._real, name)

    root._poller = Poller(root._poller)
    workers = [WorkerCollective(p[1], i, 3, 32, 1, 32, "f32") for i, p in zip((1, 2), pairs)]
    for i, w in enumerate(workers, start=1):
        threading.Timer(0.02 * i, w.all_reduce, args=(np.full((1, 32), i, np.float32),)).start()
    y = np.zeros((1, 32), np.float32)
    root.all_reduce(y)
    assert np.array_equal(y, np.full((1, 32), 3, np.float32))
    assert any(t for t in timeouts) == polls_blocking


@pytest.mark.parametrize("value", ["fast", "-1", "1.5", "99999999999"])
def test_a_bad_spin_setting_is_named(value, monkeypatch):
    from dllama.errors import DllamaError
    from dllama.net.transport import spin_seconds

    monkeypatch.setenv("DLLAMA_SPIN_US", value)
    with pytest.raises(DllamaError, match=f"^DLLAMA_SPIN_US={value!r}: must be a whole number of microseconds"):
        spin_seconds()


def test_a_worker_with_a_bad_spin_setting_stops_at_once_with_one_line():
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", "0"],
                         env=dict(os.environ, DLLAMA_SPIN_US="soon"), capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert res.stderr == "dllama: error: DLLAMA_SPIN_US='soon': must be a whole number of microseconds, 0 to 10000000\n"


def test_a_step_of_rows_returns_each_rows_candidates_or_logits():
    """Three output rows over 2 workers: row 0 asks for its logits, row 1 greedy, row 2 top 4 at T 0.7. The
    root gets row 0's logits, rows 1 and 2's merged candidates (the vocabulary's best token; the full rows
    on the fall-back, fetched once for both), in one rows frame per worker of the size the spec gives."""
    from dllama.model.collective import FULL_LOGITS

    dim, vocab, n_nodes, rows, k = 32, 96, 3, 3, 4
    cols = vocab // n_nodes
    plan = _plan(n_nodes, dim, vocab)
    pairs = [_pair(f"worker {i}") for i in range(1, n_nodes)]
    root = RootCollective([p[0] for p in pairs], plan, dim, 8, "f32")
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(rows, cols)).astype(np.float32) for _ in range(n_nodes)]
    full = np.concatenate(parts, axis=1)

    def worker(i, conn):
        coll = WorkerCollective(conn, i, n_nodes, dim, 8, cols, "f32", vocab_start=i * cols)
        coll.step()
        coll.gather(parts[i], None)
        assert coll.step() is None   # answers the full request on its way to BYE

    threads = [threading.Thread(target=worker, args=(i, p[1])) for i, p in enumerate(pairs, start=1)]
    for t in threads:
        t.start()
    root.step(rows, np.arange(rows), [FULL_LOGITS, (P.LOGITS_TOP, 0.0, 1), (P.LOGITS_TOP, 0.7, k)],
              np.arange(rows), rows)
    out = np.zeros((rows, vocab), np.float32)
    got = root.gather(parts[0], out)
    recv = root.recv_bytes
    assert np.array_equal(got[0], full[0])
    assert got[1].greedy() == int(np.argmax(full[1])) and got[1].ids.size == n_nodes
    assert got[2].ids.size == n_nodes * k
    best = {int(j) for i in range(n_nodes) for j in i * cols + np.argsort(-parts[i][2])[:k]}
    assert set(got[2].ids.tolist()) == best
    assert np.array_equal(got[2].full(), full[2]) and np.array_equal(got[1].full(), full[1])
    assert root.top_fallbacks == 1
    fetched = root.recv_bytes - recv
    root.close()
    for t in threads:
        t.join(5)
    rows_frame = 8 + 10 + P.rows_nbytes([0, 1, k], cols)
    assert rows_frame == 8 + 10 + 3 * 20 + 4 * cols + 8 + 8 * k
    times = 8 + P.TIMES_META.size
    assert recv == 2 * (times + rows_frame)
    assert fetched == 2 * (times + 8 + 10 + 4 * rows * cols)   # the one fetch of every row


def test_the_spin_flag_wins_over_the_environment(monkeypatch):
    from dllama.net import transport

    monkeypatch.setenv("DLLAMA_SPIN_US", "5")
    monkeypatch.setattr(transport, "_spin_flag", None)
    transport.set_spin("2000")
    assert transport.spin_seconds() == pytest.approx(2000e-6)
    transport.set_spin("0")   # 0 given on the command line: no spin, whatever the environment says
    assert transport.spin_seconds() == 0.0
    transport.set_spin(None)
    assert transport.spin_seconds() == pytest.approx(5e-6)


@pytest.mark.parametrize("command", [["worker", "--host", "127.0.0.1", "--port", "0"],
                                     ["inference", "--model", "absent.m", "--prompt", "hi"],
                                     ["chat", "--model", "absent.m"]])
def test_a_bad_spin_flag_stops_the_command_at_once_with_one_line(command):
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dllama", *command, "--spin-us", "2ms"],
                         env=dict(os.environ, DLLAMA_SPIN_US="2000"), capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert res.stderr == "dllama: error: --spin-us='2ms': must be a whole number of microseconds, 0 to 10000000\n"
