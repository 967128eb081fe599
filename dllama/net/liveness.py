"""How long each side waits for the other, and the root's pings while it is idle (docs/protocol.md,
"Liveness").

During a forward pass every read has a deadline derived from what was measured: FACTOR times the slowest
wait seen so far (per row of the batch, so a long prompt is not cut short by a one-token measurement),
never under FLOOR. A frozen or dead peer is so named within seconds instead of a fixed minute, on a fast
cluster as on a slow one. Between passes a worker hears from its root at least every PING_INTERVAL_S and
drops a root silent for ROOT_SILENCE_S, so a frozen root cannot hold a worker.
"""

from __future__ import annotations

import logging
import select
import threading
import time

from dllama.errors import DllamaError
from dllama.net import protocol as P
from dllama.net.transport import ConnectionLost

log = logging.getLogger("dllama.net")

PING_INTERVAL_S = 1.0
ROOT_SILENCE_S = 5.0
FLOOR_S = 3.0
FACTOR = 4.0
FIRST_WAIT_S = 60.0       # before anything is measured: the first pass may compile or page in weights


class Pacer:
    """The read deadline of one side's exchanges."""

    def __init__(self, first: float = FIRST_WAIT_S):
        self._first = first
        self._slowest = 0.0       # seconds, any batch
        self._per_row = 0.0       # seconds per row of the batch
        self._n, self._timeout = 0, first   # the last answer, asked again for every exchange of a pass

    def timeout(self, n: int) -> float:
        if n != self._n:
            self._n = n
            self._timeout = (max(FLOOR_S, FACTOR * max(self._slowest, self._per_row * n)) if self._slowest
                             else self._first)
        return self._timeout

    def observe(self, seconds: float, n: int) -> None:
        if seconds > self._slowest or seconds > self._per_row * n:
            self._slowest = max(self._slowest, seconds)
            self._per_row = max(self._per_row, seconds / n)
            self._n = 0   # recompute


class LoadedLinks:
    """What a pinger needs while the workers load: those already loaded wait for their first STEP, and
    must hear from the root while the others (and the root's own slice) are still loading."""

    def __init__(self):
        self.io_lock = threading.Lock()
        self.in_pass = False
        self.lost = None
        self.conns: list = []
        self.last_io = time.monotonic()


class Pinger:
    """A thread that keeps a root's workers sure it is alive while no forward pass runs, and notices a worker
    that closed or refused meanwhile: `coll.lost` is then set (the next step raises it) and `on_lost(exc)`
    is called, so a server can report and heal before the next request finds out."""

    def __init__(self, coll, on_lost=None, interval: float = PING_INTERVAL_S):
        self.coll, self.on_lost, self.interval = coll, on_lost, interval
        self._stop = threading.Event()
        self._ping = P.encode_bytes(P.Ping())
        self._thread = threading.Thread(target=self._run, name="dllama-ping", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def hand_over(self, coll) -> None:
        """Keep `coll` alive from now on instead of the LoadedLinks it started with."""
        old = self.coll
        with old.io_lock:
            coll.lost, coll.last_io = old.lost, old.last_io
            self.coll = coll

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 2):
            coll = self.coll
            with coll.io_lock:
                if coll is not self.coll:   # handed over meanwhile
                    continue
                if coll.in_pass or coll.lost is not None or not coll.conns:
                    continue
                lost = self._check(coll)
                if lost is None and time.monotonic() - coll.last_io >= self.interval:
                    lost = self._send_pings(coll)
                if lost is not None:
                    coll.lost = lost
            if lost is not None:
                log.warning("%s", lost)
                if self.on_lost is not None:
                    self.on_lost(lost)
                return

    def _check(self, coll):
        """A worker never speaks between passes: a readable socket is a close or a refusal."""
        try:
            readable, _, _ = select.select([c.sock for c in coll.conns], [], [], 0)
        except (OSError, ValueError):
            return coll.conns[0].lost("socket closed")
        for conn in coll.conns:
            if conn.sock in readable:
                return _why_gone(conn)
        return None

    def _send_pings(self, coll):
        for conn in coll.conns:
            try:   # straight to the socket: pings are not part of the per-token traffic the stats count
                conn.sock.sendall(self._ping)
            except OSError as exc:
                return conn.lost(f"connection lost while idle ({exc.strerror or exc})")
        coll.last_io = time.monotonic()
        return None


def _why_gone(conn):
    conn.set_timeout(1.0)
    try:
        msg = conn.recv()
    except DllamaError as exc:
        return _as_lost(exc, conn)
    if isinstance(msg, P.Refuse):
        return conn.lost(f"dropped this root: {msg.reason}")
    return conn.lost("closed the connection" if msg is None else f"sent {type(msg).__name__.upper()} while idle")


def _as_lost(exc: DllamaError, conn) -> ConnectionLost:
    return exc if isinstance(exc, ConnectionLost) else ConnectionLost(str(exc), conn.label)
