"""The worker's answers to everything that is not a well-behaved root, on real processes and sockets:
it refuses with a reason (sent to the peer and logged) and keeps serving."""

from __future__ import annotations

import socket
import time

import pytest

from cluster_fixtures import KEY, pool, unused_port, worker_pool  # noqa: F401  (fixtures)
from dllama.errors import DllamaError
from dllama.net import auth
from dllama.net import protocol as P

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _exchange(port: int, data: bytes, timeout: float = 5.0) -> list:
    """Send raw bytes as a new peer; every message the worker sends back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        dec, got = P.Decoder(), []
        while chunk := s.recv(65536):
            got += dec.feed(chunk)
        dec.close()   # the worker closes between frames, never mid-frame
        return got


def _hello(version=P.PROTOCOL_VERSION, index=1, n_nodes=2) -> bytes:
    return P.encode_bytes(P.Hello(version, index, n_nodes, auth.nonce()))


def _read(s: socket.socket, dec: P.Decoder, n: int) -> list:
    got = []
    while len(got) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += dec.feed(chunk)
    return got


def authenticated(port: int, key: bytes = KEY, index: int = 1, n_nodes: int = 2) -> socket.socket:
    """A connection that has passed the handshake as a root holding `key`: the worker has acknowledged it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    hello = P.Hello(P.PROTOCOL_VERSION, index, n_nodes, auth.nonce())
    s.sendall(P.encode_bytes(hello))
    dec = P.Decoder()
    (challenge,) = _read(s, dec, 1)
    assert isinstance(challenge, P.Challenge), challenge
    assert auth.check(auth.worker_proof(key, hello, challenge.nonce), challenge.proof)
    s.sendall(P.encode_bytes(P.Auth(auth.root_proof(key, hello, challenge.nonce))))
    (ack,) = _read(s, dec, 1)
    assert isinstance(ack, P.HelloAck), ack
    return s


def serves_a_root(port: int) -> bool:
    with authenticated(port) as s:
        s.sendall(P.encode_bytes(P.Bye()))
    return True


def _refusal(msgs) -> str:
    assert len(msgs) == 1 and isinstance(msgs[0], P.Refuse), msgs
    return msgs[0].reason


def _logged(worker, text, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in worker.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_probe_answers_and_reports_idle(pool):
    w = pool[0]
    info = w.probe()
    assert info["protocol"] == P.PROTOCOL_VERSION and info["state"] == "idle" and info["busy"] is False
    assert info["pid"] == w.proc.pid and info["root"] is None and info["node"] is None


@pytest.mark.parametrize("data,reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a dllama frame"),
    (bytes(range(200, 256)) * 4, "not a dllama frame"),
    (_hello(version=P.PROTOCOL_VERSION + 41), f"root speaks {P.PROTOCOL_VERSION + 41}, worker speaks {P.PROTOCOL_VERSION}"),
    (_hello(version=5), f"root speaks 5, worker speaks {P.PROTOCOL_VERSION}"),   # its batches gather full logits
    (P.HEADER.pack(P.BUFFER, 0, P.BUFFER_META.size, P.MAX_PAYLOAD + 1), "over the"),
    (P.HEADER.pack(P.HELLO, 0, 10, 0) + b"XXXX" + bytes(6), "magic"),
    (P.encode_bytes(P.Ready()), "expected HELLO or PROBE"),
], ids=["http", "garbage", "version", "version5", "oversized", "magic", "no-hello"])
def test_refused_logged_and_still_serving(pool, data, reason):
    w = pool[0]
    assert reason in _refusal(_exchange(w.port, data))
    assert _logged(w, reason), w.log()
    assert w.proc.poll() is None and w.probe()["state"] == "idle"
    assert serves_a_root(w.port)


def test_second_root_refused_while_first_is_served(pool):
    w = pool[0]
    with authenticated(w.port) as first:
        me = "%s:%d" % first.getsockname()
        reason = _refusal(_exchange(w.port, _hello()))
        assert reason == f"busy: serving root {me}"
        assert _logged(w, "busy")
        info = w.probe()   # a probe does not disturb the root being served
        assert info["busy"] and info["root"] == me
    assert w.wait_idle()["state"] == "idle"


def test_silent_peer_does_not_block_others(pool):
    w = pool[0]
    with socket.create_connection(("127.0.0.1", w.port), timeout=5):
        t0 = time.monotonic()
        assert w.probe()["state"] == "idle"
        assert time.monotonic() - t0 < 2


def test_probe_of_nothing_names_the_address(unused_port):
    from dllama.net import probe

    port = unused_port
    with pytest.raises(DllamaError, match=f"worker 127.0.0.1:{port}: cannot connect"):
        probe("127.0.0.1", port, 2.0)


@pytest.mark.parametrize("config,reason", [
    ({"spec": {"no_such_field": 1}, "node": {}, "seq_len": 8, "max_batch": 1, "buffer_type": "f32"},
     "no_such_field"),
    ({"spec": {}, "node": {"index": 0, "n_nodes": 2, "heads": [0, 1], "kv_heads": [0, 1], "ffn": [0, 32],
                           "vocab": [0, 8]}, "seq_len": 8, "max_batch": 1, "buffer_type": "f32"},
     "CONFIG for node 0 of 2 after HELLO as node 1 of 2"),
], ids=["bad-spec", "wrong-node"])
def test_bad_configuration_refused_with_reason_and_still_serving(pool, config, reason):
    w = pool[0]
    with authenticated(w.port) as s:
        s.sendall(P.encode_bytes(P.Config(config)))
        assert reason in _refusal(_read(s, P.Decoder(), 2))
    assert _logged(w, reason)
    assert w.wait_idle()["state"] == "idle" and w.proc.poll() is None


def test_port_in_use_is_a_one_line_error():
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"dllama: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_root_gone_in_the_middle_of_a_weight_frees_and_serves_on(pool):
    from dataclasses import asdict

    from dllama.formats.spec import ModelSpec
    from dllama.model.partition import partition

    w = pool[0]
    spec = ModelSpec(dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=32,
                     seq_len=8)
    config = {"spec": asdict(spec), "node": partition(spec, 2)[1].to_dict(), "seq_len": 8, "max_batch": 1,
              "buffer_type": "f32"}
    weight = P.encode_bytes(P.Weight("layers.0.wq", "f32", (32, 64), 0, 32 * 64 * 4, bytes(32 * 64 * 4)))
    with authenticated(w.port) as s:
        s.sendall(P.encode_bytes(P.Config(config)) + weight[:len(weight) // 2])
    assert _logged(w, "connection closed in the middle of a frame")
    assert w.wait_idle()["state"] == "idle" and w.proc.poll() is None


def test_probe_of_something_else_says_so():
    """An SSH server greets first with its banner: the probe names the address and what it saw."""
    import threading

    from dllama.net import probe

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def sshd():
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
                conn.recv(100)

        t = threading.Thread(target=sshd, daemon=True)
        t.start()
        with pytest.raises(DllamaError, match=f"worker 127.0.0.1:{port}: not a dllama worker"):
            probe("127.0.0.1", port, 2.0)
        t.join(5)
        assert not t.is_alive(), "probe left the connection open"
