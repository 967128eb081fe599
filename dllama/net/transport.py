"""Frames over a TCP socket: TCP_NODELAY, scatter-gather sends, receives into preallocated buffers.

Every failure is a `ConnectionLost` naming the peer, so the root can say which worker went away.
"""

from __future__ import annotations

import socket
import sys
import time

import numpy as np

from dllama.errors import DllamaError
from dllama.net import protocol as P

if sys.byteorder != "little":  # payloads are numpy arrays sent as they sit in memory
    raise ImportError("dllama's wire format is little-endian; this machine is not")


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
        self.timeout = timeout
        sock.settimeout(timeout)

    def set_timeout(self, timeout: float | None) -> None:
        if timeout != self.timeout:   # a syscall-free path: the per-token reads set the same value again
            self.timeout = timeout
            self.sock.settimeout(timeout)

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
        except socket.timeout:
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
        except socket.timeout:
            if self.deadline is not None:
                raise self.lost("too slow: the handshake has a deadline") from None
            raise self.lost(f"no data within {self.timeout:g} s (frozen or gone?)") from None
        except OSError as exc:
            raise self.lost(f"connection lost ({exc.strerror or exc})") from None
        return True

    def _until_deadline(self) -> None:
        # the socket timeout bounds one read; the deadline bounds all of them together, so a peer that
        # trickles one byte at a time cannot stretch a handshake
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout
        self.timeout = left
        self.sock.settimeout(left)

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
