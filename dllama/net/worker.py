"""`dllama worker`: serve one root at a time with a slice of its model, then wait for the next root.

Threads: the accept loop runs on its own thread and answers every new connection's first frame there
(PROBE -> PROBE_INFO; HELLO -> ACK, or REFUSE when busy, wrong version or garbage), so a probe or a second
root never disturbs the root being served. The accepted root is handed to the main thread, which loads the
slice and runs the forward passes until the root says BYE or goes away, then frees the slice.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import socket
import threading
import time

import numpy as np

from dllama import __version__
from dllama.errors import DllamaError
from dllama.net import protocol as P
from dllama.net.exchange import WorkerCollective
from dllama.net.memory import trim_heap
from dllama.net.transport import Connection, ConnectionLost, configure

log = logging.getLogger("dllama.worker")

HANDSHAKE_TIMEOUT = 10.0   # a new connection must send its first frame within this


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=9998, help="TCP port to listen on (default 9998)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all)")
    parser.add_argument("--nthreads", type=int, default=1, help="compute threads (default 1)")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dllama worker: %(message)s")
    if args.nthreads < 1:
        raise DllamaError(f"--nthreads must be at least 1, got {args.nthreads}")
    # bind first, so that a port in use fails at once; roots that connect while the kernels warm up wait
    # in the listen backlog
    worker = Worker(args.host, args.port, warm=warm_kernels, nthreads=args.nthreads)
    warm_kernels(args.nthreads)
    worker.serve_forever()
    return 0


def warm_kernels(nthreads: int, weight_type: str = "q40") -> None:
    """Set the thread count and compile (or load from numba's cache) every kernel a forward pass uses, by
    running a tiny one-node model of `weight_type` weights, so the first token a root asks for is not slow."""
    from dllama import kernels as K
    from dllama.formats.spec import ModelSpec
    from dllama.model.collective import LocalCollective
    from dllama.model.partition import node_tensor_names, partition, slice_tensor
    from dllama.quants import quantize

    K.set_threads(nthreads)
    t0 = time.perf_counter()
    spec = ModelSpec(dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=32,
                     seq_len=4, weight_type=weight_type)
    node = partition(spec, 1)[0]
    model = _default_model(spec, node, spec.seq_len, 2, LocalCollective())
    rng = np.random.default_rng(0)
    for name in node_tensor_names(spec, node):
        leaf = name.rsplit(".", 1)[-1]
        shape = (spec.dim,) if leaf.endswith("norm") else (32 if leaf in ("tok_embd", "wcls") else 64, 64)
        qtype = "f32" if len(shape) == 1 or leaf == "tok_embd" else weight_type
        raw = quantize(qtype, rng.standard_normal(shape, dtype=np.float32)).reshape(-1)
        model.load(*((name,) + slice_tensor(_Raw(qtype, shape, raw), name, spec, node)))
    model.finish_loading()
    model.forward(np.array([1, 2]), np.array([0, 1]))   # the prompt-batch path
    model.forward(np.array([3]), np.array([2]))         # the one-token path
    log.info("%s kernels ready in %.1f s (%d threads)", weight_type, time.perf_counter() - t0, nthreads)


class _Raw:
    """The three fields of a loader Tensor that slice_tensor reads."""

    def __init__(self, qtype, shape, data):
        self.qtype, self.shape, self.data = qtype, shape, data


def _default_model(spec, node, seq_len, max_batch, coll):
    from dllama.model.llama import NodeModel

    return NodeModel(spec, node, seq_len, max_batch, coll)


class Worker:
    """Listens on (host, port). `model_factory(spec, node, seq_len, max_batch, coll)` builds the slice's
    model (the real NodeModel by default; tests may pass a stand-in)."""

    def __init__(self, host: str, port: int, model_factory=None, warm=None, nthreads: int = 1):
        self.model_factory = model_factory or _default_model
        self._warm, self._nthreads = warm, nthreads
        self._warmed = {"q40"} if warm else set()
        try:
            self.listener = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).split(" (while attempting")[0]
            raise DllamaError(f"cannot listen on {host}:{port}: {reason}") from None
        self.address = "%s:%d" % self.listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._state = "idle"           # idle | loading | serving
        self._root: str | None = None
        self._node: tuple | None = None
        self._served = 0
        self._roots: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._tensor = None            # the tensor being received, until it is complete

    # --- accept thread ---

    def start_accepting(self) -> threading.Thread:
        t = threading.Thread(target=self._accept_loop, name="dllama-accept", daemon=True)
        t.start()
        return t

    def _accept_loop(self) -> None:
        log.info("listening on %s (protocol %d, pid %d)", self.address, P.PROTOCOL_VERSION, os.getpid())
        while not self._stop.is_set():
            try:
                sock, (host, port, *_) = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            configure(sock)
            conn = Connection(sock, f"peer {host}:{port}", HANDSHAKE_TIMEOUT)
            # its own thread: a peer that sends nothing must not hold up the next connection
            threading.Thread(target=self._greet, args=(conn,), name="dllama-greet", daemon=True).start()

    def _greet(self, conn: Connection) -> None:
        try:
            self._first_frame(conn)
        except (DllamaError, OSError) as exc:
            log.warning("refused %s: %s", conn.label.split(" ", 1)[1], exc)
            self._refuse(conn, str(exc))

    def _first_frame(self, conn: Connection) -> None:
        msg = conn.recv(max_payload=0)
        if msg is None:
            conn.close()
            return
        if isinstance(msg, P.Probe):
            conn.send(P.ProbeInfo(self.info()))
            conn.close()
            return
        if not isinstance(msg, P.Hello):
            raise P.ProtocolError(f"expected HELLO or PROBE, got {type(msg).__name__.upper()}")
        if msg.version != P.PROTOCOL_VERSION:
            raise DllamaError(f"protocol version mismatch: root speaks {msg.version}, "
                              f"worker speaks {P.PROTOCOL_VERSION}")
        if not 0 < msg.node_index < msg.n_nodes:
            raise DllamaError(f"node index {msg.node_index} of {msg.n_nodes} nodes is not a worker's")
        with self._lock:
            if self._state != "idle":
                raise DllamaError(f"busy: serving root {self._root}")
            self._state, self._root = "loading", conn.label.split(" ", 1)[1]
            conn.label = f"root {self._root}"
        try:
            conn.send(P.HelloAck(P.PROTOCOL_VERSION))
        except BaseException:
            with self._lock:
                self._state, self._root = "idle", None
            raise
        log.info("accepted %s as node %d of %d", conn.label, msg.node_index, msg.n_nodes)
        self._roots.put((conn, msg))

    def _refuse(self, conn: Connection, reason: str) -> None:
        """Send the reason, then read out what the peer still sends before closing: closing a socket with
        unread bytes resets the connection, and the peer would lose the reason."""
        try:
            conn.set_timeout(1.0)
            conn.send(P.Refuse(reason))
            conn.sock.shutdown(socket.SHUT_WR)
            conn.drain(1.0, 1 << 24)
        except (DllamaError, OSError):
            pass
        conn.close()

    def info(self) -> dict:
        with self._lock:
            return {"protocol": P.PROTOCOL_VERSION, "version": __version__, "pid": os.getpid(),
                    "state": self._state, "busy": self._state != "idle", "root": self._root,
                    "node": self._node, "served": self._served}

    # --- main thread ---

    def serve_forever(self) -> None:
        self.start_accepting()
        try:
            while not self._stop.is_set():
                try:
                    conn, hello = self._roots.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.serve_root(conn, hello)
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass

    def serve_root(self, conn: Connection, hello: P.Hello) -> None:
        """Load the slice the root sends, run its forward passes, and free everything when it leaves."""
        try:
            model, coll = self._load(conn, hello)
            with self._lock:
                self._state = "serving"
            conn.set_timeout(None)   # a root may sit idle between requests; keepalive notices a dead one
            steps, t0 = 0, time.perf_counter()
            while (positions := coll.step()) is not None:
                model.forward(None, positions, logits=coll.wants_logits)
                steps += 1
            busy = time.perf_counter() - t0
            log.info("%s %s after %d forward passes (%.1f s: %.1f s waiting on the network)", conn.label,
                     "said goodbye" if coll.said_bye else "closed the connection", steps, busy, coll.transfer_s)
        except ConnectionLost as exc:
            log.warning("%s went away: %s", conn.label, exc)
        except Exception as exc:  # noqa: BLE001 (any failure ends this root's session, never the worker)
            if isinstance(exc, DllamaError):
                log.warning("dropped %s: %s", conn.label, exc)
            else:
                log.exception("dropped %s after an internal error", conn.label)
            self._refuse(conn, f"worker {self.address}: {exc}")
        finally:
            conn.close()
            model = coll = self._tensor = None
            gc.collect()
            trim_heap()
            with self._lock:
                self._state, self._root, self._node = "idle", None, None
                self._served += 1
            log.info("slice freed; waiting for a root")

    def _load(self, conn: Connection, hello: P.Hello):
        cfg = conn.expect(P.Config).config
        from dllama.formats.spec import ModelSpec
        from dllama.model.partition import NodeSlice

        spec, node = ModelSpec(**cfg["spec"]), NodeSlice.from_dict(cfg["node"])
        if (node.index, node.n_nodes) != (hello.node_index, hello.n_nodes):
            raise P.ProtocolError(f"CONFIG for node {node.index} of {node.n_nodes} after HELLO as node "
                                  f"{hello.node_index} of {hello.n_nodes}")
        seq_len, max_batch, buffer_type = int(cfg["seq_len"]), int(cfg["max_batch"]), cfg["buffer_type"]
        with self._lock:
            self._node = (node.index, node.n_nodes)
        if self._warm and spec.weight_type not in self._warmed:
            self._warm(self._nthreads, spec.weight_type)
            self._warmed.add(spec.weight_type)
        coll = WorkerCollective(conn, node.index, node.n_nodes, spec.dim, max_batch, len(node.vocab), buffer_type,
                                node.vocab.start)
        model = self.model_factory(spec, node, seq_len, max_batch, coll)
        t0, total = time.perf_counter(), 0
        while (head := conn.recv_header()) is not None:
            t, meta, payload_len = head
            if t == P.READY:
                break
            if t != P.WEIGHT:
                raise P.ProtocolError(f"expected WEIGHT or READY, got {P.TYPE_NAMES[t]}")
            total += self._receive_weight(conn, model, bytes(meta), payload_len)
        else:
            raise ConnectionLost(f"{conn.label}: closed the connection while sending weights")
        model.finish_loading()
        trim_heap()
        conn.send(P.Ready())
        log.info("loaded node %d of %d: %.1f MB in %.1f s", node.index, node.n_nodes, total / 1e6,
                 time.perf_counter() - t0)
        return model, coll

    def _receive_weight(self, conn: Connection, model, meta: bytes, payload_len: int) -> int:
        # the header of the chunk is decoded with an empty payload, then the bytes land in the tensor itself
        w = P.decode_frame(P.WEIGHT, meta, b"")
        if w.offset + payload_len > w.total:
            raise P.ProtocolError(f"WEIGHT {w.name}: chunk past the end of the tensor")
        if w.offset == 0:
            self._tensor = np.empty(w.total, np.uint8)
        elif self._tensor is None or self._tensor.size != w.total:
            raise P.ProtocolError(f"WEIGHT {w.name}: chunk at {w.offset} without its start")
        conn.recv_into(self._tensor[w.offset:w.offset + payload_len])
        if w.offset + payload_len == w.total:
            tensor, self._tensor = self._tensor, None
            model.load(w.name, w.qtype, tuple(w.shape), tensor)
            return w.total
        return 0


def probe(host: str, port: int, timeout: float = 3.0) -> dict:
    """Ask a worker what it is doing, without disturbing it: {"protocol", "version", "pid", "state"
    ("idle" | "loading" | "serving"), "busy", "root" ("host:port" or None), "node", "served"}.

    Raises DllamaError naming the address if nothing answers or the answer is not a dllama worker's."""
    from dllama.net.transport import connect

    label = f"worker {host}:{port}"
    conn = connect(host, port, timeout, label)
    try:
        conn.send(P.Probe())
        return conn.expect(P.ProbeInfo).info
    except P.ProtocolError as exc:   # something else listens there (sshd's banner, an HTTP server)
        raise DllamaError(f"{label}: not a dllama worker ({str(exc).removeprefix(label + ': ')})") from None
    finally:
        conn.close()
