"""The root's side of a cluster: connect to the workers, hand each its configuration and weight slice
(streamed from the memory-mapped model file, unless the worker holds that very slice in a local file), and
return the collective the forward pass runs on."""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np

from dllama.errors import DllamaError
from dllama.net import auth
from dllama.net import protocol as P
from dllama.net.exchange import RootCollective
from dllama.net.liveness import LoadedLinks, Pinger
from dllama.net.memory import release_pages, trim_heap
from dllama.net.transport import Connection, ConnectionLost, connect

DEFAULT_TIMEOUT = 10.0
IO_TIMEOUT_FACTOR = 6      # loading and per-token reads may wait on a busy worker this many times longer
CHUNK = 8 << 20            # bytes of a tensor per WEIGHT frame
DEFAULT_PORT = 9998
BUSY_WAIT = 3.0            # s: how long a busy worker is retried; one frees the last root's slice in ~1 s
LOCAL_LOAD_TIMEOUT = 900.0  # s: a worker reading (and hashing) its slice file from a slow SD card


def parse_address(address) -> tuple[str, int]:
    """'host:port' (or 'host', port 9998, or a (host, port) pair) -> (host, port). Raises DllamaError
    naming a bad one."""
    if isinstance(address, tuple):
        return str(address[0]).strip("[]"), int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DllamaError(f"bad worker address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def connect_workers(addresses, loaded, plan, seq_len: int, buffer_type: str = "q80", nthreads: int = 1,
                    log=None, max_batch: int = 32, timeout: float = DEFAULT_TIMEOUT, key: bytes | None = None,
                    on_lost=None, n_slots: int = 1, progress=None) -> RootCollective:
    """Connect to `addresses` (node i + 1 is addresses[i]), load each with its slice of `loaded` (a worker
    that announces a local slice file of this model and plan loads that instead), and return the root's
    collective. `plan` is the partition, or a function of the workers' calibration reports ([(values/s,
    free bytes)], asked for at handshake) that returns it (`--split auto`): it may refuse, before any weight
    is sent. `nthreads` is the root's own; each worker has its --nthreads. `key` is the cluster key (None:
    none); each worker keeps `n_slots` conversations' KV caches. The collective pings the workers while
    idle; `on_lost(exc)` is called
    (from the ping thread) if one goes away meanwhile. `progress(label, total_bytes)` gives each streamed
    worker a bar (see dllama.progress.Board).

    Raises DllamaError naming the worker that could not be reached, refused, or failed while loading.
    """
    planner = plan if callable(plan) else None
    n_nodes = 1 + len(addresses)
    if planner is None and len(addresses) != len(plan) - 1:
        raise DllamaError(f"{len(addresses)} workers for a plan of {len(plan)} nodes")
    calibration = (loaded.spec.weight_type, loaded.spec.dim) if planner else None
    say = log or (lambda msg: None)
    conns: list[Connection] = []
    loaded_links = LoadedLinks()
    pinger = Pinger(loaded_links, on_lost)
    try:
        reports, announced = _connect_all(addresses, n_nodes, timeout, key, calibration, conns, say,
                                          planner.measure if planner else None)
        if planner:
            plan = planner(reports)
        # after planning: a local slice is used only where it was cut by the very plan in force
        local = _accept_local_slices(conns, announced, loaded, plan, say)
        t0 = time.perf_counter()
        config = {"spec": loaded.spec.to_dict(), "seq_len": seq_len, "max_batch": max_batch,
                  "buffer_type": buffer_type, "n_slots": n_slots}
        for conn in conns:
            conn.set_timeout(timeout * IO_TIMEOUT_FACTOR)
        with ThreadPoolExecutor(max_workers=len(conns)) as pool:
            jobs = [pool.submit(_load_worker, conn, loaded, node, config, loaded_links, own, progress)
                    for conn, node, own in zip(conns, plan[1:], local)]
            wait(jobs, return_when=FIRST_EXCEPTION)
            failed = [job for job in jobs if job.done() and job.exception()]
            if failed:   # stop the other streams now rather than after they have sent everything
                for conn in conns:
                    conn.abort()
                raise failed[0].exception()
            sent = sum(job.result() for job in jobs)
        trim_heap()
        streamed = len(conns) - sum(local)
        say(f"sent {sent / 1e6:.1f} MB of weights to {streamed} workers in {time.perf_counter() - t0:.1f} s"
            + (f"; {sum(local)} loaded their local slices" if any(local) else ""))
    except BaseException:
        pinger.stop()
        for conn in conns:
            conn.close()
        raise
    coll = RootCollective(conns, plan, loaded.spec.dim, max_batch, buffer_type)
    pinger.hand_over(coll)
    coll.pinger = pinger
    return coll


def _accept_local_slices(conns, announced, loaded, plan, say) -> list[bool]:
    """Per worker, whether it loads its own slice file: only one cut from this very model file by this
    plan for its node. Any other is logged with the reason, and that worker is streamed its weights."""
    from dllama.net.slicefile import mismatch, model_fingerprint, plan_sha256

    if not any(announced):
        return [False] * len(conns)
    try:
        model_id = model_fingerprint(loaded.path)
    except (OSError, TypeError):
        model_id = None   # a model built in memory: no worker's file can be of it
    plan_digest = plan_sha256(loaded.spec, plan)
    out = []
    for i, (conn, local) in enumerate(zip(conns, announced), start=1):
        why = mismatch(local, model_id, plan_digest, i, len(plan)) if local else "no local slice"
        if local and why:
            say(f"{conn.label}: not using its local slice: {why}; streaming its weights")
        elif local:
            say(f"{conn.label}: loads its local slice (node {i} of {len(plan)})")
        out.append(why is None)
    return out


def _connect_all(addresses, n_nodes: int, timeout: float, key, calibration, conns: list, say,
                 measure) -> tuple[list, list]:
    """Connect to every worker, appending to `conns`; their calibration reports and local slice
    announcements. With calibration the handshakes run at once, and `measure()` (the root's own
    calibration) meanwhile: every node is timed while all compute, as in a forward pass, so nodes that
    share a core each measure their part of it."""
    targets = [(i, *parse_address(a)) for i, a in enumerate(addresses, start=1)]

    def one(target):
        i, host, port = target
        conn, report, local = _connect_worker(host, port, i, n_nodes, timeout, key, calibration)
        say(f"connected to worker {host}:{port} (node {i} of {n_nodes})")
        return conn, report, local

    if calibration is None:
        reports, announced = [], []
        for t in targets:
            conn, report, local = one(t)
            conns.append(conn)
            reports.append(report)
            announced.append(local)
        return reports, announced
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        jobs = [pool.submit(one, t) for t in targets]
        try:
            measure()
        finally:
            wait(jobs)
            conns.extend(job.result()[0] for job in jobs if not job.exception())
    for job in jobs:
        if job.exception():
            raise job.exception()
    return [job.result()[1] for job in jobs], [job.result()[2] for job in jobs]


def _connect_worker(host: str, port: int, index: int, n_nodes: int, timeout: float,
                    key: bytes | None, calibration=None) -> tuple[Connection, tuple | None, bytes]:
    """A connection to the worker at host:port that has accepted this root as node `index`, its
    calibration report (values/s, free bytes or None) if `calibration` (qtype, cols) asked for one, and
    the local slice it announced (empty: none).

    A worker still freeing the previous root's slice refuses as busy for up to a second after that root
    leaves, so a busy refusal is retried with backoff for BUSY_WAIT seconds before it is reported."""
    deadline, delay = time.monotonic() + BUSY_WAIT, 0.1
    while True:
        conn = connect(host, port, timeout, f"worker {host}:{port}")
        try:
            busy, report, local = _handshake(conn, index, n_nodes, key, calibration)
        except BaseException:
            conn.close()
            raise
        if busy is None:
            return conn, report, local
        conn.close()
        if time.monotonic() + delay > deadline:
            raise DllamaError(f"{conn.label}: refused: {busy} (still busy after {BUSY_WAIT:g} s)")
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _handshake(conn: Connection, index: int, n_nodes: int, key: bytes | None,
               calibration=None) -> tuple[str | None, tuple | None, bytes]:
    """HELLO, the worker's proof checked, ours sent: only a worker holding our key ever gets a CONFIG.
    (None, its calibration report or None, its local slice announcement) once the worker has acknowledged,
    or (its reason, None, b"") if it refused because it is busy (it says so before the challenge, and again
    after authentication)."""
    hello = P.Hello(P.PROTOCOL_VERSION, index, n_nodes, auth.nonce(), *(calibration or (None, 0)))
    conn.send(hello)
    local = b""
    try:
        challenge = conn.expect(P.Challenge, P.Refuse)
        if isinstance(challenge, P.Challenge):
            local = challenge.local
            if not auth.check(auth.worker_proof(key, hello, challenge.nonce, local), challenge.proof):
                raise DllamaError(f"{conn.label}: authentication failed: the worker does not hold this root's "
                                  "cluster key (check --cluster-key-file on both)")
            conn.send(P.Auth(auth.root_proof(key, hello, challenge.nonce, local)))
            ack = conn.expect(P.HelloAck, P.Refuse)
        else:
            ack = challenge
    except P.ProtocolError as exc:   # something else listens there
        raise DllamaError(f"{conn.label}: not a dllama worker ({str(exc).removeprefix(conn.label + ': ')})") from None
    if isinstance(ack, P.Refuse):
        if ack.reason.startswith("busy"):
            return ack.reason, None, b""
        raise DllamaError(f"{conn.label}: refused: {ack.reason}")
    if ack.version != P.PROTOCOL_VERSION:
        raise DllamaError(f"{conn.label}: speaks protocol version {ack.version}, this root {P.PROTOCOL_VERSION}")
    if calibration is None:
        return None, None, local
    if not auth.check(auth.report_mac(key, hello, challenge.nonce, ack.speed, ack.free), ack.mac):
        raise DllamaError(f"{conn.label}: its calibration report fails authentication")
    if not (math.isfinite(ack.speed) and ack.speed > 0):
        raise DllamaError(f"{conn.label}: reported a speed of {ack.speed!r}")
    return None, (ack.speed, ack.free or None), local


def _load_worker(conn: Connection, loaded, node, config: dict, loaded_links: LoadedLinks, local: bool,
                 progress=None) -> int:
    """Stream one worker its CONFIG and tensors (only the CONFIG to one that loads its `local` slice), then
    wait until it has packed them; from then on the pinger keeps it. Returns bytes of weights sent."""
    try:
        io_timeout = conn.timeout
        if local:
            conn.send(P.Config({**config, "node": node.to_dict(), "weights": "local"}))
            sent = 0
        else:
            sent = _stream_slice(conn, loaded, node, config, progress)
    except ConnectionLost:
        # a worker that gives up (out of memory, bad tensor) says why before closing: find its reason
        conn.set_timeout(1.0)
        try:
            msg = conn.recv()
        except DllamaError:
            msg = None
        if isinstance(msg, P.Refuse):
            raise DllamaError(f"{conn.label}: refused: {msg.reason}") from None
        raise
    conn.send(P.Ready())
    if local:   # the worker reads (and hashes) its whole slice file before it answers
        conn.set_timeout(LOCAL_LOAD_TIMEOUT)
    conn.expect(P.Ready)
    conn.set_timeout(io_timeout)
    with loaded_links.io_lock:
        loaded_links.conns.append(conn)
    return sent


def _stream_slice(conn: Connection, loaded, node, config: dict, progress=None) -> int:
    from dllama.model.partition import node_tensor_names, slice_nbytes, slice_tensor

    spec = loaded.spec
    bar = progress(f"weights to {conn.label}", slice_nbytes(loaded.tensors, spec, node)) if progress else None
    conn.send(P.Config({**config, "node": node.to_dict()}))
    sent = 0
    for name in node_tensor_names(spec, node):
        tensor = loaded.tensors[name]
        part = slice_tensor(tensor, name, spec, node)
        if part is None:
            continue
        qtype, shape, raw = part
        raw = np.ascontiguousarray(raw).reshape(-1)
        for offset in range(0, max(raw.size, 1), CHUNK):
            conn.send(P.Weight(name, qtype, tuple(shape), offset, raw.size, raw[offset:offset + CHUNK]))
            if bar:
                bar.update(min(CHUNK, raw.size - offset))
        sent += raw.size
        # a column slice was read from every row of the tensor: drop all of it (the root re-reads its own
        # part from the page cache when it loads); the copy itself is freed before the next tensor is cut
        release_pages(tensor.data)
        del raw, part
    if bar:
        bar.finish()
    return sent


__all__ = ["connect_workers", "parse_address", "ConnectionLost", "DEFAULT_TIMEOUT"]
