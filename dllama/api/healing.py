"""The API's cluster: which workers are up, and joining them again after one is lost, without a restart.

A worker lost during a request (a ConnectionLost or ProtocolError out of the forward pass) or while idle
(the root's pinger) makes the server "degraded": the request in flight fails with the node's name,
/health names the node, and the engine thread reconnects with backoff (BACKOFF_S doubling up to
MAX_BACKOFF_S) until every worker has authenticated and received its slice again. Every transition is
logged.
"""

from __future__ import annotations

import logging
import threading
import time

from dllama.errors import DllamaError

log = logging.getLogger("dllama.api")

BACKOFF_S = 0.5
MAX_BACKOFF_S = 2.0


def _address(exc) -> str | None:
    peer = getattr(exc, "peer", None) or ""
    return peer.split(" ", 1)[1] if peer.startswith("worker ") else None


class Cluster:
    """The workers' states as /health reports them, and the healing loop (run on the engine thread)."""

    def __init__(self, service, workers):
        self.service = service
        self._lock = threading.Lock()
        self._nodes = {a: {"address": a, "role": "worker", "state": "up"} for a in workers}
        self._broken = threading.Event()
        self.degraded_since: float | None = None

    def nodes(self) -> list:
        with self._lock:
            return [{"address": "local", "role": "root", "state": "up"}] + [dict(n) for n in self._nodes.values()]

    @property
    def broken(self) -> bool:
        return self._broken.is_set()

    def lost(self, exc) -> None:
        """A worker is gone (any thread): mark it down and the server degraded."""
        address = _address(exc)
        with self._lock:
            for node in self._nodes.values():
                if address is None or node["address"] == address:
                    node.update(state="down", error=str(exc), since=time.time())
            first = not self._broken.is_set()
            self._broken.set()
            if first:
                self.degraded_since = time.monotonic()
        if first:
            log.warning("cluster degraded: %s", exc)
            self.service.degraded()
        runner = self.service.runner
        if runner is not None:
            runner.wake()

    def heal(self, engine, stopping: threading.Event) -> bool:
        """Reconnect until the cluster is whole again (True) or the server stops (False)."""
        delay, attempt = BACKOFF_S, 0
        while not stopping.is_set():
            attempt += 1
            log.info("reconnecting to the workers (attempt %d)", attempt)
            try:
                engine.reconnect()
            except DllamaError as exc:
                self._failed_attempt(exc)
                log.warning("reconnect attempt %d failed: %s; next in %.1f s", attempt, exc, delay)
                if stopping.wait(delay):
                    return False
                delay = min(2 * delay, MAX_BACKOFF_S)
                continue
            with self._lock:
                for address, node in self._nodes.items():
                    node.clear()
                    node.update(address=address, role="worker", state="up")
                self._broken.clear()
                took = time.monotonic() - (self.degraded_since or time.monotonic())
            log.info("cluster re-formed after %d attempt(s), %.1f s degraded: serving again", attempt, took)
            from dllama.api import metrics

            metrics.worker_reconnects.inc()
            self.service.healed()
            return True
        return False

    def _failed_attempt(self, exc) -> None:
        address = _address(exc)
        if address is None:
            return
        with self._lock:
            node = self._nodes.get(address)
            if node is not None:
                node.update(state="down", error=str(exc))
