"""Frames over a TCP socket: TCP_NODELAY, scatter-gather sends, receives into preallocated buffers.

A connection's timeout is the kernel's (SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket), not Python's: a
Python socket with a timeout polls before every send and receive, which doubles the system calls of an
exchange. Every failure is a `ConnectionLost` naming the peer, so the root can say which worker went away.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time

import numpy as np

from dllama.errors import DllamaError
from dllama.net import protocol as P

if sys.byteorder != "little":  # payloads are numpy arrays sent as they sit in memory
    raise ImportError("dllama's wire format is little-endian; this machine is not")


SPIN_ENV = "DLLAMA_SPIN_US"
# seconds a per-exchange receive keeps asking without blocking (see spin_seconds): none by default, since
# a node that spins takes the core from a node or process sharing it (measured with bench/split.py on an
# idle 2-core machine, two workers on one core: 11.0 tokens/s with a 2 ms spin, 35.4 without)
SPIN_S = 0.0


_spin_flag: float | None = None   # --spin-us, when given: it wins over the environment


def spin_seconds() -> float:
    """How long a per-exchange receive asks again before it sleeps: --spin-us (set_spin), else
    $DLLAMA_SPIN_US microseconds, else SPIN_S (0: sleep at once). The peer answers when its share of the
    layer is done, often hundreds of microseconds later; a process that slept meanwhile is woken by the
    kernel (a virtual machine's idle CPU by its host, tens of microseconds) on every exchange of both
    sides: on nodes that each have a core to themselves, a spin of about 2000 saves that. On a host whose
    cores are shared, any spin takes the core from whoever would produce the answer. Raises DllamaError
    for a value that is not a number of microseconds."""
    if _spin_flag is not None:
        return _spin_flag
    raw = os.environ.get(SPIN_ENV)
    return SPIN_S if raw is None else parse_spin_us(raw, SPIN_ENV)


def parse_spin_us(raw: str, name: str) -> float:
    """Seconds from a whole number of microseconds, 0 to 10 s; DllamaError naming `name` otherwise."""
    try:
        us = int(raw)
    except ValueError:
        us = -1
    if not 0 <= us <= 10_000_000:
        raise DllamaError(f"{name}={raw!r}: must be a whole number of microseconds, 0 to 10000000")
    return us * 1e-6


def set_spin(raw: str | None) -> None:
    """The --spin-us flag's value (None: not given, the environment decides); DllamaError if malformed."""
    global _spin_flag
    _spin_flag = None if raw is None else parse_spin_us(raw, "--spin-us")


class ConnectionLost(DllamaError):
    """The peer closed the connection, reset it, or did not answer in time. `peer` is the connection's
    label ("worker host:port"), when known."""

    def __init__(self, message: str, peer: str | None = None):
        super().__init__(message)
        self.peer = peer


def configure(sock: socket.socket) -> None:
    """Small frames go out at once; a peer that vanishes without a FIN is noticed by keepalive."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def connect(host: str, port: int, timeout: float, label: str) -> "Connection":
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise ConnectionLost(f"{label}: no answer within {timeout:g} s", label) from None
    except OSError as exc:
        raise ConnectionLost(f"{label}: cannot connect ({exc.strerror or exc})", label) from None
    configure(sock)
    return Connection(sock, label, timeout)


class Connection:
    """One peer. `send` / `recv` for control messages; `send_frame` / `recv_header` / `recv_into` for the
    per-token path, which allocates no buffers."""

    def __init__(self, sock: socket.socket, label: str, timeout: float | None):
        self.sock = sock
        self.label = label
        self.sent_bytes = 0
        self.recv_bytes = 0
        self._head = bytearray(P.HEADER.size + P.MAX_META)
        self._head_mv = memoryview(self._head)
        self.deadline: float | None = None   # time.monotonic() by which every read must be done, if set
        self.timeout = -1.0   # not set yet
        self.set_timeout(timeout)
        self.spin = 0.0   # seconds a per-exchange receive asks before it blocks: the collectives set it
        self._poller = None

    def set_timeout(self, timeout: float | None) -> None:
        """Seconds any one send or receive may wait for the peer (None: no limit). Free when unchanged: the
        per-exchange path may set it every time."""
        if timeout == self.timeout and self.sock.gettimeout() is None:
            return
        self.sock.settimeout(None)   # blocking: the kernel keeps the time
        self.timeout = timeout
        t = 0.0 if timeout is None else max(timeout, 1e-3)
        tv = struct.pack("@ll", int(t), int(round((t - int(t)) * 1e6)))
        try:
            for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                self.sock.setsockopt(socket.SOL_SOCKET, opt, tv)
        except OSError:
            pass   # a closed socket: its next use says so

    def lost(self, what: str) -> ConnectionLost:
        return ConnectionLost(f"{self.label}: {what}", self.label)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Close now, waking any thread blocked on this socket (close alone does not)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close()

    # --- sending ---

    def send(self, msg) -> None:
        self.send_buffers(P.encode(msg))

    def send_frame(self, t: int, meta, payload) -> None:
        """A frame from its parts; meta is at most MAX_META bytes, payload any bytes-like (not copied)."""
        meta = memoryview(meta).cast("B")
        payload = memoryview(payload).cast("B")
        P.HEADER.pack_into(self._head, 0, t, 0, len(meta), len(payload))
        self._head[P.HEADER.size:P.HEADER.size + len(meta)] = meta
        self.send_buffers([self._head_mv[:P.HEADER.size + len(meta)], payload])

    def send_all(self, frame) -> None:
        """One contiguous frame (a memoryview of bytes): the per-exchange path, one system call as a rule."""
        try:
            sent = self.sock.send(frame)
        except OSError:
            sent = 0   # send_buffers says what went wrong
        self.sent_bytes += sent
        if sent < len(frame):
            self.send_buffers([frame[sent:]])

    def send_buffers(self, buffers) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if len(v)]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                self.sent_bytes += sent
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except (BlockingIOError, socket.timeout):
            raise self.lost(f"send timed out after {self.timeout:g} s (frozen or overloaded?)") from None
        except OSError as exc:
            raise self.lost(f"connection lost while sending ({exc.strerror or exc})") from None

    # --- receiving ---

    def recv_into(self, view, *, at_boundary: bool = False) -> bool:
        """Fill `view` completely. Returns False only if `at_boundary` and the peer closed cleanly first."""
        view = memoryview(view).cast("B")
        got = 0
        try:
            while got < len(view):
                if self.deadline is not None:
                    self._until_deadline()
                k = self.sock.recv_into(view[got:])
                if k == 0:
                    if at_boundary and got == 0:
                        return False
                    raise self.lost("connection closed in the middle of a frame")
                got += k
                self.recv_bytes += k
        except (BlockingIOError, socket.timeout):
            raise self._timed_out() from None
        except OSError as exc:
            raise self.lost(f"connection lost ({exc.strerror or exc})") from None
        return True

    def _until_deadline(self) -> None:
        # the receive timeout bounds one read; the deadline bounds all of them together, so a peer that
        # trickles one byte at a time cannot stretch a handshake
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout
        self.set_timeout(left)

    def _timed_out(self) -> ConnectionLost:
        if self.deadline is not None:
            return self.lost("too slow: the handshake has a deadline")
        return self.lost(f"no data within {self.timeout:g} s (frozen or gone?)")

    def recv_frame_into(self, head, payload, expect) -> int:
        """The per-exchange receive: a frame's header and meta into `head`, its payload into `payload`
        (writable byte memoryviews; payload may be empty), with as few system calls as the data allows.
        Returns the bytes received: all of head and payload, or fewer when the peer closed first or sent
        something else (the head then differs from `expect`, the bytes the frame should start with)."""
        total, got = len(head) + len(payload), 0
        bufs = [head, payload]
        try:
            got = self._spin(bufs)
            if got:
                self.recv_bytes += got
                if got < total:
                    bufs = [head[got:], payload] if got < len(head) else [payload[got - len(head):]]
            while got < total:
                if got >= len(head) and head != expect:
                    break   # not the frame expected: the caller says what it is instead
                k = self.sock.recvmsg_into(bufs)[0]
                if k == 0:
                    break
                got += k
                self.recv_bytes += k
                if got < total:
                    bufs = [head[got:], payload] if got < len(head) else [payload[got - len(head):]]
        except (BlockingIOError, socket.timeout):
            raise self._timed_out() from None
        except OSError as exc:
            raise self.lost(f"connection lost ({exc.strerror or exc})") from None
        return got

    def _spin(self, bufs) -> int:
        """Bytes received into `bufs` by asking without blocking for up to `self.spin` seconds; 0 if none."""
        deadline = None
        while True:
            try:
                return self.sock.recvmsg_into(bufs, 0, socket.MSG_DONTWAIT)[0]
            except BlockingIOError:
                now = time.perf_counter()
                if deadline is None:
                    deadline = now + self.spin
                if now >= deadline:   # without a spin: one try
                    return 0

    def spin_readable(self) -> None:
        """Wait for the peer's next bytes without blocking for up to `self.spin` seconds: the wait before a
        receive that does not go through recv_frame_into (a worker's next STEP, several workers' answers)."""
        if not self.spin:
            return
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        deadline = time.perf_counter() + self.spin
        while not self._poller.poll(0) and time.perf_counter() < deadline:
            pass

    def drain(self, seconds: float, limit: int) -> None:
        """Read and drop what the peer still sends, for up to `seconds` or `limit` bytes, or until it closes."""
        deadline, drained, scratch = time.monotonic() + seconds, 0, bytearray(1 << 16)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while drained < limit:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return
            try:
                k = self.sock.recv_into(scratch)
            except OSError:
                return
            if not k:
                return
            drained += k

    def recv_header(self):
        """(type, meta memoryview, payload_len) of the next frame, or None on a clean close between frames.
        The meta view is valid until the next call."""
        if not self.recv_into(self._head_mv[:P.HEADER.size], at_boundary=True):
            return None
        try:
            t, meta_len, payload_len = P.parse_header(self._head)
        except P.ProtocolError as exc:
            raise P.ProtocolError(f"{self.label}: {exc}") from None
        meta = self._head_mv[P.HEADER.size:P.HEADER.size + meta_len]
        self.recv_into(meta)
        return t, meta, payload_len

    def recv(self, max_payload: int = P.MAX_PAYLOAD):
        """The next message, or None on a clean close. Payloads here are control-sized (CONFIG, PROBE_INFO)."""
        head = self.recv_header()
        if head is None:
            return None
        t, meta, payload_len = head
        if payload_len > max_payload:
            raise P.ProtocolError(f"{P.TYPE_NAMES[t]} frame of {payload_len} bytes where at most {max_payload} were expected")
        meta = bytes(meta)
        payload = np.empty(payload_len, np.uint8)
        self.recv_into(payload)
        return P.decode_frame(t, meta, payload)

    def expect(self, *types):
        """The next message, which must be one of `types` (REFUSE is raised as the peer's reason)."""
        msg = self.recv()
        if msg is None:
            raise self.lost("closed the connection")
        if isinstance(msg, P.Refuse) and P.Refuse not in types:
            raise DllamaError(f"{self.label}: refused: {msg.reason}")
        if not isinstance(msg, types):
            raise P.ProtocolError(f"{self.label}: expected {' or '.join(t.__name__.upper() for t in types)}, "
                                  f"got {type(msg).__name__.upper()}")
        return msg
