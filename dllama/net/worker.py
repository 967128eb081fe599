"""`dllama worker`: serve one root at a time with a slice of its model, then wait for the next root.

Threads: the accept loop runs on its own thread and hands every new connection to a greeter thread, at
most MAX_PENDING at once (beyond that a connection is refused at once), which answers its first frames
within HANDSHAKE_DEADLINE_S (PROBE -> PROBE_INFO; HELLO -> the key's challenge, then ACK, or REFUSE when
busy, unauthenticated, wrong version or garbage), so a probe or a second root never disturbs the root
being served, and no peer can hold a thread for long. The accepted root is handed to the main thread,
which loads the slice and runs the forward passes until the root says BYE, goes away or falls silent
(liveness.ROOT_SILENCE_S), then frees the slice.
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
from dllama.net import auth
from dllama.net import protocol as P
from dllama.net.exchange import WorkerCollective
from dllama.net.limits import check_config, config_slots, weight_bytes
from dllama.net.liveness import FIRST_WAIT_S, ROOT_SILENCE_S
from dllama.net.memory import freeze_survivors, thaw, trim_heap
from dllama.net.transport import Connection, ConnectionLost, configure, spin_seconds

log = logging.getLogger("dllama.worker")

HANDSHAKE_DEADLINE_S = 5.0   # a new connection must complete its handshake (or probe) within this, in all
MAX_PENDING = 32             # connections being greeted at once; more are refused at once
MAX_CONFIG = 1 << 20         # bytes of a CONFIG's JSON


def serve(args) -> int:
    """`dllama worker` once its flags are checked: serve roots until killed. Raises DllamaError."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dllama worker: %(message)s")
    key = auth.key_from_args(args)
    spin_seconds()   # a bad $DLLAMA_SPIN_US fails at the start, not when a root comes
    if key is None and not args.insecure and not auth.is_loopback(args.host):
        raise DllamaError(f"refusing to listen on {args.host} without a cluster key: anyone who can reach the "
                          f"port could use this worker; give --cluster-key-file (or ${auth.KEY_ENV}), "
                          "or --insecure")
    # bind first, so that a port in use fails at once; roots that connect while the kernels warm up wait
    # in the listen backlog
    local = None
    if getattr(args, "weights", None):
        from dllama.net.slicefile import SliceFile

        local = SliceFile(args.weights)   # a wrong or damaged file fails here, not when a root comes
        h = local.header
        log.info("local slice %s: node %d of %d, %.1f MB of weights", args.weights, h["node_index"],
                 h["n_nodes"], local.payload_size / 1e6)
    worker = Worker(args.host, args.port, warm=warm_kernels, nthreads=args.nthreads, key=key, local=local)
    warm_kernels(args.nthreads)
    worker.serve_forever()
    return 0


def warm_kernels(nthreads: int, weight_type: str = "q40") -> None:
    """Set the thread count and compile (or load from numba's cache) every kernel a forward pass uses, by
    running a tiny one-node model of `weight_type` weights, so the first token a root asks for is not slow."""
    from dllama import kernels as K
    from dllama import schema
    from dllama.formats.spec import ModelSpec
    from dllama.model.collective import LocalCollective
    from dllama.model.partition import node_tensor_names, partition, slice_tensor
    from dllama.quants import QUANTS, quantize

    K.set_threads(nthreads)
    t0 = time.perf_counter()
    if QUANTS[weight_type].read_only:
        # a GGUF-only type: no quantizer to make the tiny model from; its matmuls warmed alone, the rest by Q80's
        K.warmup((weight_type,))
        weight_type = "q80"
    spec = ModelSpec(dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=32,
                     seq_len=4, weight_type=weight_type)
    node = partition(spec, 1)[0]
    model = _default_model(spec, node, spec.seq_len, 2, LocalCollective())
    rng = np.random.default_rng(0)
    for name in node_tensor_names(spec, node):
        row = schema.parse(name)[0]
        shape = row.shape(spec)
        qtype = "f32" if len(shape) == 1 or row.take == schema.RAW else weight_type
        raw = quantize(qtype, rng.standard_normal(shape, dtype=np.float32)).reshape(-1)
        model.load(*((name,) + slice_tensor(_Raw(qtype, shape, raw), name, spec, node)))
    model.finish_loading()
    model.forward(np.array([1, 2]), np.array([0, 1]))   # the prompt-batch path
    model.forward(np.array([3]), np.array([2]))         # the one-token path
    # The candidates kernel too, the one cached kernel outside the forward pass: numba keeps one cache folder
    # per source folder, made by the first process that needs it. Made here (the roles run this as the
    # service user), it is the service's; a root run as root that made it first would leave it unwritable to
    # the workers, which then cannot even import the module ("no locator available").
    from dllama.net.exchange import _warm_top_k

    _warm_top_k()
    log.info("%s kernels ready in %.1f s (%d threads)", weight_type, time.perf_counter() - t0, nthreads)


class _Raw:
    """The three fields of a loader Tensor that slice_tensor reads."""

    def __init__(self, qtype, shape, data):
        self.qtype, self.shape, self.data = qtype, shape, data


def _default_model(spec, node, seq_len, max_batch, coll, n_slots=1):
    from dllama.model.llama import NodeModel

    return NodeModel(spec, node, seq_len, max_batch, coll, n_slots)


class Worker:
    """Listens on (host, port). `model_factory(spec, node, seq_len, max_batch, coll, n_slots)` builds the
    slice's model (the real NodeModel by default; tests may pass a stand-in). `local` is the worker's slice
    file (slicefile.SliceFile), offered to every root at the handshake."""

    def __init__(self, host: str, port: int, model_factory=None, warm=None, nthreads: int = 1,
                 key: bytes | None = None, local=None):
        self.model_factory = model_factory or _default_model
        self._key = key
        self._local = local
        self._announce = P.json_bytes(local.announcement()) if local else b""
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
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
        log.info("listening on %s (protocol %d, pid %d, %s)", self.address, P.PROTOCOL_VERSION, os.getpid(),
                 "cluster key required" if self._key else "NO cluster key: any peer may connect")
        while not self._stop.is_set():
            try:
                self._accept_one()
            except Exception:  # noqa: BLE001 (the loop must outlive anything: a deaf worker is the worst case)
                if self._stop.is_set():
                    return
                log.exception("accept loop: unexpected error; accepting on")
                time.sleep(0.1)

    def _accept_one(self) -> None:
        try:
            sock, (host, port, *_) = self.listener.accept()
        except OSError as exc:
            if not self._stop.is_set():
                # out of file descriptors (EMFILE) and the like: the backlog keeps the peer until we recover
                log.warning("accept failed: %s", exc.strerror or exc)
                time.sleep(0.1)
            return
        conn = Connection(sock, f"peer {host}:{port}", HANDSHAKE_DEADLINE_S)
        if not self._pending.acquire(blocking=False):
            log.warning("refused %s: %d connections are already being greeted", f"{host}:{port}", MAX_PENDING)
            _refuse_now(conn, f"busy: {MAX_PENDING} connections are already being greeted; retry shortly")
            return
        try:
            configure(sock)
            conn.deadline = time.monotonic() + HANDSHAKE_DEADLINE_S
            # its own thread: a peer that sends nothing must not hold up the next connection
            threading.Thread(target=self._greet, args=(conn,), name="dllama-greet", daemon=True).start()
        except BaseException as exc:
            self._pending.release()
            log.warning("refused %s: cannot greet it (%s)", f"{host}:{port}", exc)
            _refuse_now(conn, f"worker overloaded: {exc}")
            if not isinstance(exc, Exception):
                raise

    def _greet(self, conn: Connection) -> None:
        try:
            self._handshake(conn)
        except (DllamaError, OSError) as exc:
            log.warning("refused %s: %s", conn.label.split(" ", 1)[1], exc)
            self._refuse(conn, str(exc))
        except Exception:  # noqa: BLE001 (a bug here must cost this connection only)
            log.exception("refused %s after an internal error", conn.label.split(" ", 1)[1])
            self._refuse(conn, "internal error in the worker (see its log)")
        finally:
            self._pending.release()

    def _handshake(self, conn: Connection) -> None:
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
        self._check_idle()
        mine = auth.nonce()
        conn.send(P.Challenge(mine, auth.worker_proof(self._key, msg, mine, self._announce), self._announce))
        reply = conn.expect(P.Auth)
        if not auth.check(auth.root_proof(self._key, msg, mine, self._announce), reply.proof):
            raise DllamaError("authentication failed: the root does not hold this worker's cluster key")
        with self._lock:
            self._check_idle()
            self._state, self._root = "loading", conn.label.split(" ", 1)[1]
            conn.label = f"root {self._root}"
        conn.deadline = None
        try:
            conn.send(self._ack(msg, mine))
        except BaseException:
            with self._lock:
                self._state, self._root = "idle", None
            raise
        log.info("accepted %s as node %d of %d", conn.label, msg.node_index, msg.n_nodes)
        self._roots.put((conn, msg))

    def _ack(self, hello: P.Hello, mine: bytes) -> P.HelloAck:
        """HELLO_ACK, with this worker's calibration and free memory if the root asked (--split auto)."""
        if hello.calibrate is None:
            return P.HelloAck(P.PROTOCOL_VERSION)
        from dllama.model.split import calibrate
        from dllama.net.memory import available_bytes

        speed, free = calibrate(hello.calibrate, hello.calibrate_cols), available_bytes() or 0
        log.info("calibrated: %.2f G %s values/s, %.0f MB free", speed / 1e9, hello.calibrate, free / 1e6)
        return P.HelloAck(P.PROTOCOL_VERSION, speed, free, auth.report_mac(self._key, hello, mine, speed, free))

    def _check_idle(self) -> None:
        if self._state != "idle":
            raise DllamaError(f"busy: serving root {self._root}")

    def _refuse(self, conn: Connection, reason: str) -> None:
        """Send the reason, then read out what the peer still sends before closing: closing a socket with
        unread bytes resets the connection, and the peer would lose the reason."""
        try:
            conn.deadline = None
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
                    "node": self._node, "served": self._served, "key_required": self._key is not None,
                    "root_silence_s": ROOT_SILENCE_S}

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
            steps, t0 = 0, time.perf_counter()
            coll.on_release = model.kv.release
            while (positions := coll.step()) is not None:
                if coll.slots.max() >= model.kv.n_slots or coll.slots.min() < 0:
                    raise P.ProtocolError(f"{conn.label}: STEP for slot {int(coll.slots.max())}, the CONFIG set up "
                                          f"{model.kv.n_slots}")
                model.forward(None, positions, logits=coll.wants_logits, slots=coll.slots, out_rows=coll.out_rows)
                steps += 1
            busy = time.perf_counter() - t0
            log.info("%s %s after %d forward passes (%.1f s: %.1f s computing, %.1f s on the network)", conn.label,
                     "said goodbye" if coll.said_bye else "closed the connection", steps, busy,
                     coll.compute_s, coll.transfer_s)
        except ConnectionLost as exc:
            log.warning("%s went away: %s", conn.label, exc)
        except Exception as exc:  # noqa: BLE001 (any failure ends this root's session, never the worker)
            if isinstance(exc, DllamaError):
                log.warning("dropped %s: %s", conn.label, exc)
            else:
                log.exception("dropped %s after an internal error", conn.label)
            self._refuse(conn, str(exc))   # the root names this worker as it reached it
        finally:
            conn.close()
            model = coll = self._tensor = None
            thaw()
            gc.collect()
            trim_heap()
            with self._lock:
                self._state, self._root, self._node = "idle", None, None
                self._served += 1
            log.info("slice freed; waiting for a root")

    def _load(self, conn: Connection, hello: P.Hello):
        # the root streams from its disk: reads may wait that long, not forever
        conn.set_timeout(FIRST_WAIT_S)
        msg = conn.recv(max_payload=MAX_CONFIG)
        if msg is None:
            raise conn.lost("closed the connection before its CONFIG")
        if not isinstance(msg, P.Config):
            raise P.ProtocolError(f"{conn.label}: expected CONFIG, got {type(msg).__name__.upper()}")
        spec, node, seq_len, max_batch, buffer_type = check_config(msg.config, hello)
        n_slots = config_slots(msg.config)
        with self._lock:
            self._node = (node.index, node.n_nodes)
        if self._warm and spec.weight_type not in self._warmed:
            self._warm(self._nthreads, spec.weight_type)
            self._warmed.add(spec.weight_type)
        coll = WorkerCollective(conn, node.index, node.n_nodes, spec.dim, max_batch, len(node.vocab), buffer_type,
                                node.vocab.start)
        model = self.model_factory(spec, node, seq_len, max_batch, coll, n_slots)
        t0 = time.perf_counter()
        if msg.config.get("weights") == "local":
            if self._local is None:
                raise P.ProtocolError(f"{conn.label}: asks for local weights, but this worker has none (--weights)")
            total, source = self._local.load_into(model, spec, node), f"from {self._local.path}"
            conn.expect(P.Ready)
        else:
            total, source = self._receive_weights(conn, model, spec, node), "from the root"
        model.finish_loading()
        trim_heap()
        freeze_survivors()
        conn.send(P.Ready())
        log.info("loaded node %d of %d: %.1f MB %s in %.1f s", node.index, node.n_nodes, total / 1e6, source,
                 time.perf_counter() - t0)
        return model, coll

    def _receive_weights(self, conn: Connection, model, spec, node) -> int:
        """The WEIGHT frames up to the root's READY, each tensor loaded as it completes. Returns bytes."""
        # what the CONFIG was admitted for bounds what the WEIGHT frames may make this worker allocate
        budget, total = weight_bytes(spec, node), 0
        while (head := conn.recv_header()) is not None:
            t, meta, payload_len = head
            if t == P.READY:
                return total
            if t != P.WEIGHT:
                raise P.ProtocolError(f"expected WEIGHT or READY, got {P.TYPE_NAMES[t]}")
            total += self._receive_weight(conn, model, bytes(meta), payload_len, budget - total)
        raise conn.lost("closed the connection while sending weights")

    def _receive_weight(self, conn: Connection, model, meta: bytes, payload_len: int, room: int) -> int:
        # the header of the chunk is decoded with an empty payload, then the bytes land in the tensor itself
        w = P.decode_frame(P.WEIGHT, meta, b"")
        if w.offset + payload_len > w.total:
            raise P.ProtocolError(f"WEIGHT {w.name}: chunk past the end of the tensor")
        if w.offset == 0 and w.total > room:
            raise P.ProtocolError(f"WEIGHT {w.name}: {w.total} bytes, more than is left of the slice's "
                                  "largest possible size: not this CONFIG's weights")
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


def _refuse_now(conn: Connection, reason: str) -> None:
    """Refuse from the accept thread: one attempt to send the reason, never a wait."""
    try:
        conn.sock.setblocking(False)
        conn.sock.send(P.encode_bytes(P.Refuse(reason)))
    except OSError:
        pass
    conn.close()


def probe(host: str, port: int, timeout: float = 3.0) -> dict:
    """Ask a worker what it is doing, without disturbing it: {"protocol", "version", "pid", "state"
    ("idle" | "loading" | "serving"), "busy", "root" ("host:port" or None), "node", "served",
    "key_required", "root_silence_s"}. No key is needed: the answer says nothing secret.

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
