"""Fixtures for clusters on loopback: real `dllama worker` processes on 127.0.0.1 ports, holding the
test session's cluster key (KEY, in the file KEY_FILE; roots pass KEY_ARGS or key=KEY).

Not a conftest.py: a second module named `conftest` would shadow tests/conftest.py for the test modules
that import helpers from it. Test modules import these fixtures by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _write_key() -> tuple[bytes, str]:
    """One key per test session; a root script started by a test (which imports this module) shares it."""
    import atexit
    import secrets
    import tempfile

    inherited = os.environ.get("DLLAMA_TEST_KEY_FILE")
    if inherited:
        return Path(inherited).read_bytes().rstrip(), inherited
    key = secrets.token_hex(32).encode()
    fd, path = tempfile.mkstemp(prefix="dllama-test-key-")   # mode 0600
    os.write(fd, key + b"\n")
    os.close(fd)
    atexit.register(os.unlink, path)
    os.environ["DLLAMA_TEST_KEY_FILE"] = path
    return key, path


KEY, KEY_FILE = _write_key()
KEY_ARGS = ["--cluster-key-file", KEY_FILE]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`dllama worker` on 127.0.0.1:port; its log (stderr) goes to a file the test can read. `prefix`: a
    command the worker is started through (which must exec it)."""

    def __init__(self, tmp: Path, nthreads: int = 1, key_args=KEY_ARGS, port: int | None = None, args=(),
                 prefix=()):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = tmp / f"worker-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(self.port),
             "--nthreads", str(nthreads), *key_args, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 120.0) -> "WorkerProcess":
        from dllama.net import probe
        from dllama.errors import DllamaError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                probe("127.0.0.1", self.port, 1.0)
                return self
            except DllamaError:
                time.sleep(0.1)
        raise RuntimeError(f"worker not answering after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def probe(self) -> dict:
        from dllama.net import probe

        return probe("127.0.0.1", self.port, 3.0)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.probe()
            if info["state"] == "idle" or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (free a moment ago)."""
    return free_port()


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    """Three workers shared by a module's tests that leave them running (each test starts with them idle):
    serving root after root is itself part of what is tested."""
    workers = [WorkerProcess(tmp_path_factory.mktemp("pool")) for _ in range(3)]
    try:
        yield [w.wait_ready() for w in workers]
    finally:
        for w in workers:
            w.stop()


@pytest.fixture
def pool(worker_pool):
    for w in worker_pool:
        assert w.proc.poll() is None, w.log()
        assert w.wait_idle()["state"] == "idle", w.log()
    return worker_pool


@pytest.fixture
def start_workers(tmp_path):
    """start_workers(n) -> n ready WorkerProcess objects, killed at the end of the test."""
    started: list[WorkerProcess] = []

    def start(n: int, nthreads: int = 1) -> list[WorkerProcess]:
        new = [WorkerProcess(tmp_path, nthreads) for _ in range(n)]
        started.extend(new)
        return [w.wait_ready() for w in new]

    yield start
    for w in started:
        w.stop()


def random_cluster_model(d: Path, **shape) -> tuple[Path, Path]:
    """Write into `d` a random Llama-3-shaped Q40 model with 8 heads / 4 KV heads (splits over 1, 2, 4
    nodes) and a byte-level tokenizer for it (256 byte tokens, <s>, </s>, filler pairs): (m.m, t.t).
    `shape`: other ModelSpec sizes (dim, hidden_dim, n_layers, seq_len) than the default small ones."""
    import numpy as np

    from dllama.formats.dlm import write_dlm
    from dllama.formats.dlt import TokenizerData, write_t
    from dllama.formats.random_model import preset_spec, random_tensors

    spec = preset_spec("llama3_2_1b", "q40", **{**dict(dim=256, hidden_dim=512, n_layers=3, n_heads=8, n_kv_heads=4,
                                                     vocab_size=512, seq_len=256), **shape})

    def tensors():
        # weights 10x the preset's N(0, 0.02): with tiny weights the stream is the embedding and greedy
        # decoding repeats one token; these give varied tokens with top-2 logit gaps >= 0.07 (spread ~3)
        for name, src in random_tensors(spec, seed=7):
            yield name, src if isinstance(src, np.ndarray) else (10 * rows for rows in src)

    write_dlm(str(d / "m.m"), spec, tensors())
    tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>"]
    tokens += [bytes([97 + i // 26, 97 + i % 26]) for i in range(512 - len(tokens))]
    scores = [0.0] * 258 + [-float(i) for i in range(512 - 258)]
    write_t(str(d / "t.t"), TokenizerData(tokens, scores, bos_id=256, eos_ids=[257],
                                          special_ids=frozenset({256, 257})))
    return d / "m.m", d / "t.t"
