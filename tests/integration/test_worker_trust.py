"""Issue 11 on real worker processes over loopback: only a root holding the cluster key gets in, nothing a
stranger does (slow handshakes, a thousand idle connections, a hostile CONFIG) leaves the worker deaf or
bloated, and a frozen peer on either side is noticed within the stated times."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster_fixtures import KEY, KEY_FILE, WorkerProcess, free_port, pool, start_workers, worker_pool  # noqa: F401
from test_cluster import PROMPT, Root, model_files  # noqa: F401  (the model fixture)
from test_worker_faults import _logged, _read, _refusal, authenticated, serves_a_root
from dllama.errors import DllamaError
from dllama.net import auth
from dllama.net import protocol as P
from dllama.net.liveness import ROOT_SILENCE_S
from dllama.net.worker import HANDSHAKE_DEADLINE_S, MAX_PENDING

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _serves_a_real_root(path, w) -> bool:
    root = Root(path, [w.address])
    try:
        return root.forward(PROMPT, 0).shape == (512,)
    finally:
        root.close()


def _probe_within_1s(w) -> dict:
    """The hang check of the acceptance: a status probe answered within a second."""
    from dllama.net import probe

    return probe("127.0.0.1", w.port, 1.0)


def _refused_handshake(port: int, key: bytes | None) -> str:
    """A root holding `key` (None: no key) tries to join; the worker's refusal."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    with s:
        hello = P.Hello(P.PROTOCOL_VERSION, 1, 2, auth.nonce())
        s.sendall(P.encode_bytes(hello))
        dec = P.Decoder()
        (challenge,) = _read(s, dec, 1)
        s.sendall(P.encode_bytes(P.Auth(auth.root_proof(key, hello, challenge.nonce))))
        return _refusal(_read(s, dec, 1))


# --- authentication ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, b"not the cluster key"], ids=["no-key", "wrong-key"])
def test_root_without_the_key_is_refused_and_the_worker_serves_on(pool, key):
    w = pool[0]
    assert "authentication failed" in _refused_handshake(w.port, key)
    assert _logged(w, "authentication failed")
    assert _probe_within_1s(w)["state"] == "idle" and serves_a_root(w.port)


def test_a_recorded_handshake_replayed_or_reflected_is_refused(pool):
    w = pool[0]
    # record what a real root sends: its HELLO and its AUTH for the worker's challenge
    s = socket.create_connection(("127.0.0.1", w.port), timeout=5)
    hello = P.Hello(P.PROTOCOL_VERSION, 1, 2, auth.nonce())
    s.sendall(P.encode_bytes(hello))
    dec = P.Decoder()
    (challenge,) = _read(s, dec, 1)
    recorded = P.encode_bytes(hello) + P.encode_bytes(P.Auth(auth.root_proof(KEY, hello, challenge.nonce)))
    s.sendall(recorded[len(P.encode_bytes(hello)):])
    # the worker's acknowledgement first: until then it may not have taken this root on, and the idle
    # check below could see the moment before rather than the end of this session
    (ack,) = _read(s, dec, 1)
    assert isinstance(ack, P.HelloAck), ack
    s.sendall(P.encode_bytes(P.Bye()))
    s.close()
    assert w.wait_idle()["state"] == "idle"
    # replayed as is: the worker's new nonce makes the recorded proof worthless
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as s:
        s.sendall(recorded)
        got = _read(s, P.Decoder(), 2)
    assert isinstance(got[0], P.Challenge) and "authentication failed" in _refusal(got[1:])
    # reflected: the worker's own proof sent back as the root's
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as s:
        s.sendall(P.encode_bytes(hello))
        dec = P.Decoder()
        (challenge,) = _read(s, dec, 1)
        s.sendall(P.encode_bytes(P.Auth(challenge.proof)))
        assert "authentication failed" in _refusal(_read(s, dec, 1))
    assert _probe_within_1s(w)["state"] == "idle" and serves_a_root(w.port)


def test_strangers_are_refused_while_the_real_root_is_served(model_files, pool):
    w = pool[0]
    root = Root(model_files[0], [w.address])
    try:
        expected = root.forward(PROMPT, 0)
        for key in (KEY, None, b"wrong"):
            with pytest.raises(DllamaError, match=f"worker {w.address}: refused: busy"):
                _refused_root(model_files[0], w, key)
        assert root.forward([65], len(PROMPT)).shape == expected.shape   # still served
    finally:
        root.close()


def _refused_root(path, w, key):
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition
    from dllama.net.root import connect_workers

    loaded = load_model(str(path))
    connect_workers([w.address], loaded, partition(loaded.spec, 2), 64, "f32", key=key)


def test_root_refuses_a_worker_with_another_key(model_files, tmp_path):
    other = tmp_path / "other.key"
    other.write_bytes(b"another cluster\n")
    other.chmod(0o600)
    w = WorkerProcess(tmp_path, key_args=["--cluster-key-file", str(other)])
    try:
        w.wait_ready()
        with pytest.raises(DllamaError, match=f"worker {w.address}: authentication failed: the worker does not "
                                              "hold this root's cluster key"):
            Root(model_files[0], [w.address])
    finally:
        w.stop()


def _worker_cli(*args, env_key: str | None = None, timeout: float = 120):
    env = {k: v for k, v in os.environ.items() if k != auth.KEY_ENV}
    if env_key is not None:
        env[auth.KEY_ENV] = env_key
    return subprocess.run([sys.executable, "-m", "dllama", "worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_keyless_worker_refuses_a_non_loopback_address(monkeypatch, capsys):
    r = _worker_cli("--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("dllama: error: refusing to listen on 0.0.0.0 without a cluster key")
    # and before any socket is bound (in-process, so that a bind would be seen)
    from dllama.cli import main

    def no_bind(*args, **kw):
        raise AssertionError(f"bound {args}")

    monkeypatch.delenv(auth.KEY_ENV, raising=False)
    monkeypatch.setattr(socket, "create_server", no_bind)
    assert main(["worker", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without a cluster key" in capsys.readouterr().err
    assert main(["worker", "--host", "::", "--port", "0"]) == 2


def test_key_file_problems_are_one_line_errors(tmp_path):
    empty, public, good = tmp_path / "empty", tmp_path / "public", tmp_path / "good"
    empty.write_bytes(b" \n")
    empty.chmod(0o600)
    public.write_bytes(b"secret")
    public.chmod(0o644)
    cases = [(["--cluster-key-file", str(tmp_path / "missing")], None, "cannot read it"),
             (["--cluster-key-file", str(empty)], None, "the file is empty"),
             (["--cluster-key-file", str(public)], None, "readable by every user"),
             ([], str(empty), f"{auth.KEY_ENV} {empty}: the file is empty")]
    for args, env_key, reason in cases:
        r = _worker_cli("--host", "127.0.0.1", "--port", str(free_port()), *args, env_key=env_key)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and reason in r.stderr, r.stderr
        assert "secret" not in r.stderr


# --- bounded worker ------------------------------------------------------------------------------------

def test_slow_handshake_is_cut_at_the_deadline(model_files, pool):
    w = pool[0]
    frame = P.encode_bytes(P.Hello(P.PROTOCOL_VERSION, 1, 2, auth.nonce()))
    t0 = time.monotonic()
    got = b""
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as s:
        for byte in frame:   # one byte every 0.5 s: 25 s for the HELLO, were it allowed
            try:
                s.sendall(bytes([byte]))
                got = s.recv(1 << 16, socket.MSG_DONTWAIT)
                break
            except (BlockingIOError, socket.timeout):   # nothing yet
                pass
            time.sleep(0.5)
    elapsed = time.monotonic() - t0
    assert "the handshake has a deadline" in _refusal(P.Decoder().feed(got)), got
    assert HANDSHAKE_DEADLINE_S - 0.5 < elapsed < HANDSHAKE_DEADLINE_S + 3
    assert _logged(w, "the handshake has a deadline"), w.log()
    assert _probe_within_1s(w)["state"] == "idle" and _serves_a_real_root(model_files[0], w)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads line")


def test_a_thousand_idle_connections_hold_no_thread_each(model_files, pool):
    w = pool[0]
    before = _threads(w.proc.pid)
    socks, most = [], 0
    try:
        for _ in range(1000):
            socks.append(socket.create_connection(("127.0.0.1", w.port), timeout=5))
        time.sleep(0.5)
        most = _threads(w.proc.pid)
        # beyond the greeters' bound a connection is refused at once, with the reason (the ones just past
        # it: on a loaded machine the thousand connects outlast the first greeters' handshake deadline,
        # which frees their places for the last ones)
        refusals = [m for s in socks[MAX_PENDING + 5:MAX_PENDING + 15] for m in _read_nowait(s)]
        assert any(isinstance(m, P.Refuse) and "connections are already being greeted" in m.reason
                   for m in refusals), refusals
    finally:
        for s in socks:
            s.close()
    assert most <= before + MAX_PENDING + 2, (before, most)
    assert _probe_within_1s(w)["state"] == "idle" and _serves_a_real_root(model_files[0], w)


def _read_nowait(s: socket.socket) -> list:
    s.settimeout(2.0)
    try:
        return P.Decoder().feed(s.recv(1 << 16))
    except OSError:
        return []


@pytest.mark.parametrize("change,reason", [
    ({"seq_len": 2_000_000}, "seq_len must be an integer in [1, 1048576]"),
    ({"max_batch": 10 ** 9}, "max_batch must be an integer"),
    ({"seq_len": 1 << 20, "spec": {"n_layers": 4096, "dim": 8192}}, "MB available"),
    ({"spec": {"weight_type": "q99"}}, "weight_type must be one of"),
    ({"node": {"heads": [0, 4096]}}, "is not node 1's of this model"),
    ({"n_slots": 10 ** 6}, "n_slots must be an integer"),
    ({"seq_len": 1 << 20, "n_slots": 1024, "spec": {"n_layers": 64}}, "x 1024 slots"),
], ids=["seq-len", "max-batch", "memory", "weight-type", "slice", "slots", "slots-memory"])
def test_hostile_config_refused_before_allocating(model_files, pool, change, reason):
    from dataclasses import asdict

    from dllama.formats.spec import ModelSpec
    from dllama.model.partition import partition

    w = pool[0]
    base = dict(dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=32, seq_len=8)
    spec = ModelSpec(**{**base, **change.get("spec", {})})
    node = {**partition(ModelSpec(**{**asdict(spec), "n_layers": 1, "dim": 64}), 2)[1].to_dict(),
            **change.get("node", {})}
    config = {"spec": asdict(spec), "node": node, "seq_len": change.get("seq_len", 8),
              "max_batch": change.get("max_batch", 1), "buffer_type": "f32", "n_slots": change.get("n_slots", 1)}
    rss = w.rss_bytes()
    with authenticated(w.port) as s:
        s.sendall(P.encode_bytes(P.Config(config)))
        assert reason in _refusal(_read(s, P.Decoder(), 1))
    assert w.rss_bytes() - rss < 50e6
    assert _probe_within_1s(w)["pid"] == w.proc.pid
    assert w.wait_idle()["state"] == "idle" and _serves_a_real_root(model_files[0], w)


def test_accept_loop_survives_thread_start_failures(monkeypatch):
    """Thread exhaustion, simulated in-process: a greeter thread that cannot start costs that connection
    only (refused with the reason); the loop goes on and the next one is greeted."""
    from dllama.net import probe
    from dllama.net.worker import Worker

    w = Worker("127.0.0.1", 0, key=KEY)
    w.start_accepting()
    real_start = threading.Thread.start
    failures = []

    def start(self):
        if self.name == "dllama-greet" and len(failures) < 3:
            failures.append(self)
            raise RuntimeError("can't start new thread")
        return real_start(self)

    try:
        host, port = w.address.split(":")
        monkeypatch.setattr(threading.Thread, "start", start)
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                got = _read_nowait(s)
            assert got and "worker overloaded: can't start new thread" in got[0].reason
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert probe(host, int(port), 1.0)["state"] == "idle"
        assert serves_a_root(int(port))
    finally:
        monkeypatch.setattr(threading.Thread, "start", real_start)
        w.stop()


# --- liveness ------------------------------------------------------------------------------------------

def test_frozen_worker_is_named_within_5s_with_default_settings(model_files, start_workers):
    (w,) = start_workers(1)
    root = Root(model_files[0], [w.address], "q80")
    try:
        root.greedy(steps=3)
        w.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(DllamaError, match=f"worker {w.address}: no data within"):
            for i in range(10_000):
                root.forward([65], len(PROMPT) + 3 + i)
        elapsed = time.monotonic() - t0
    finally:
        w.proc.send_signal(signal.SIGCONT)
        root.close()
    assert elapsed < 5


def test_idle_root_keeps_its_workers_by_pinging(model_files, pool):
    w = pool[0]
    root = Root(model_files[0], [w.address])
    try:
        first = root.forward(PROMPT, 0)
        time.sleep(ROOT_SILENCE_S + 2)
        assert w.probe()["state"] == "serving"
        assert root.forward(PROMPT, 0).tolist() == first.tolist()
    finally:
        root.close()


ROOT_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from test_cluster import Root, PROMPT
root = Root(sys.argv[2], sys.argv[3:])
root.forward(PROMPT, 0)
print("ready", flush=True)
for i in range(100_000):
    root.forward([65], len(PROMPT) + i % 200)
"""


def test_frozen_root_releases_its_worker_within_the_stated_time(model_files, pool):
    w = pool[0]
    root = subprocess.Popen([sys.executable, "-c", ROOT_SCRIPT, str(Path(__file__).parent), str(model_files[0]),
                             w.address], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout.readline().strip() == "ready"
        root.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        while w.probe()["state"] != "idle" and time.monotonic() - t0 < ROOT_SILENCE_S + 5:
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
    finally:
        root.kill()
        root.wait(10)
    assert elapsed < ROOT_SILENCE_S + 3, w.log()
    assert _probe_within_1s(w)["state"] == "idle"
    other = Root(model_files[0], [w.address])   # a new root gets the worker
    other.close()


def test_a_loaded_worker_is_kept_while_another_still_loads(model_files, pool):
    """The first worker to finish loading waits for its first STEP while a slower one (a stand-in that
    takes longer than ROOT_SILENCE_S to say READY) is still loading: the root pings it meanwhile."""
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition
    from dllama.net.root import connect_workers

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def slow_worker():
            conn, _ = server.accept()
            with conn:
                dec, msgs = P.Decoder(), []
                while not msgs:
                    msgs += dec.feed(conn.recv(1 << 16))
                nonce = auth.nonce()
                conn.sendall(P.encode_bytes(P.Challenge(nonce, auth.worker_proof(KEY, msgs[0], nonce))))
                while not any(isinstance(m, P.Auth) for m in msgs):
                    msgs += dec.feed(conn.recv(1 << 16))
                conn.sendall(P.encode_bytes(P.HelloAck(P.PROTOCOL_VERSION)))
                while not any(isinstance(m, P.Ready) for m in msgs):
                    msgs += dec.feed(conn.recv(1 << 20))
                time.sleep(ROOT_SILENCE_S + 2)
                conn.sendall(P.encode_bytes(P.Ready()))
                while conn.recv(1 << 16):
                    pass

        t = threading.Thread(target=slow_worker, daemon=True)
        t.start()
        loaded = load_model(str(model_files[0]))
        seen = len(pool[0].log())
        coll = connect_workers([pool[0].address, f"127.0.0.1:{port}", pool[1].address], loaded,
                               partition(loaded.spec, 4), 64, "f32", key=KEY)
        try:
            assert [w.probe()["state"] for w in pool[:2]] == ["serving", "serving"]
            assert "went away" not in pool[0].log()[seen:]
        finally:
            coll.close()
        t.join(10)


def test_weights_beyond_the_admitted_slice_are_refused(pool):
    """A CONFIG admitted for a tiny slice cannot be followed by a tensor of gigabytes."""
    from dataclasses import asdict

    from dllama.formats.spec import ModelSpec
    from dllama.model.partition import partition

    w = pool[0]
    spec = ModelSpec(dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=32,
                     seq_len=8)
    config = {"spec": asdict(spec), "node": partition(spec, 2)[1].to_dict(), "seq_len": 8, "max_batch": 1,
              "buffer_type": "f32"}
    huge = P.Weight("layers.0.wq", "f32", (65536, 16384), 0, 65536 * 16384 * 4, bytes(64))
    with authenticated(w.port) as s:
        s.sendall(P.encode_bytes(P.Config(config)) + P.encode_bytes(huge))
        assert "more than is left of the slice" in _refusal(_read(s, P.Decoder(), 1))
    assert w.wait_idle()["state"] == "idle" and serves_a_root(w.port)
