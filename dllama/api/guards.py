"""Connection-level guards for uvicorn's h11 server: a client must send its request line and headers
within HEADER_TIMEOUT_S of connecting (or of its previous response), and its body within BODY_TIMEOUT_S
of its headers, or the connection is closed. uvicorn itself bounds only idle keep-alive time, so without
these a few hundred clients sending a byte now and then hold every connection slot and file descriptor.
"""

from __future__ import annotations

import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dllama.api")

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0     # a 4 MB body at 1 Mbit/s takes half of this


class GuardedH11Protocol(H11Protocol):
    _phase: str | None = None
    _timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self._phase:
            return
        self._cancel()
        self._phase = phase
        if phase is not None and not self.transport.is_closing():
            limit = HEADER_TIMEOUT_S if phase == "headers" else BODY_TIMEOUT_S
            self._timer = self.loop.call_later(limit, self._expired, limit)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, limit: float) -> None:
        self._timer = None
        if not self.transport.is_closing():
            client = "%s:%d" % tuple(self.client[:2]) if self.client else "a client"
            log.info("closed %s: its request %s did not arrive within %g s", client, self._phase, limit)
            self.transport.close()


def raise_open_file_limit(want: int = 65536) -> int:
    """Raise this process's soft limit on open files toward the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
