"""`dllama-api` as a real process on loopback: it survives slow clients, refuses to be exposed without a
key, and heals by itself when a worker is lost and comes back (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from cluster_fixtures import KEY_ARGS, WorkerProcess, free_port
from test_api_cluster import split_model  # noqa: F401  (fixture: a random SmolLM2-shaped model that splits in 2)
from test_api_openai import LAUNCH, httpx, running_server

from dllama.api.guards import HEADER_TIMEOUT_S

pytestmark = [pytest.mark.slow, pytest.mark.network]

COMMON = ["--nthreads", "1", "--max-seq-len", "256", "--buffer-float-type", "f32"]


def _pid(base: str) -> int:
    # the server's process: the only one listening on its port
    port = base.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def test_slow_clients_cannot_starve_health(split_model, smollm2_path):
    with running_server(split_model, "--tokenizer", smollm2_path, *COMMON) as base:
        host, port = base.removeprefix("http://").split(":")
        slow = []
        try:
            for _ in range(300):   # each starts a request and never finishes its headers
                s = socket.create_connection((host, int(port)), timeout=5)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            trickler = socket.create_connection((host, int(port)), timeout=5)
            t0 = time.monotonic()
            r = httpx.get(f"{base}/health", timeout=1.0)   # the hang check: answered within a second
            assert r.status_code == 200 and r.json()["status"] == "ready"
            # a header sent one byte a second is cut at the deadline, not kept alive by each byte
            closed_at = None
            while time.monotonic() - t0 < HEADER_TIMEOUT_S + 5:
                try:
                    trickler.sendall(b"X")
                    trickler.settimeout(1.0)
                    if trickler.recv(1) == b"":
                        closed_at = time.monotonic() - t0
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed_at = time.monotonic() - t0
                    break
            assert closed_at is not None and closed_at < HEADER_TIMEOUT_S + 3
            for s in slow:   # and the silent ones were closed too
                s.settimeout(5.0)
                assert s.recv(1) == b""
            assert httpx.get(f"{base}/health", timeout=1.0).status_code == 200
        finally:
            for s in slow:
                s.close()


def _api(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_API_KEY"}
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_no_key_no_exposure(split_model, tmp_path, monkeypatch, capsys):
    r = _api("--model", split_model, "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("dllama-api: error: refusing to listen on 0.0.0.0 without an API key")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = _api("--model", split_model, "--api-key-file", str(empty))
    assert r.returncode == 2 and "--api-key-file" in r.stderr and "empty" in r.stderr, r.stderr
    # refused before the socket is bound (in-process, so that a bind would be seen)
    from dllama.api import server
    from dllama.cli import main_api

    def no_listen(*args):
        raise AssertionError(f"bound {args}")

    monkeypatch.delenv("DLLAMA_API_KEY", raising=False)
    monkeypatch.setattr(server, "_listen", no_listen)
    assert main_api(["--model", split_model, "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def _chat(base: str, timeout: float = 60):
    return httpx.post(f"{base}/v1/chat/completions", timeout=timeout,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})


def test_api_heals_when_a_lost_worker_returns(split_model, smollm2_path, tmp_path):
    w = WorkerProcess(tmp_path).wait_ready()
    try:
        with running_server(split_model, "--tokenizer", smollm2_path, *COMMON, "--workers", w.address,
                            *KEY_ARGS) as base:
            pid = _pid(base)
            health = httpx.get(f"{base}/health").json()
            assert health["status"] == "ready"
            assert [n["state"] for n in health["nodes"]] == ["up", "up"] and health["nodes"][1]["address"] == w.address
            assert _chat(base).status_code == 200

            # a reply in flight when the worker dies ends with an error naming it
            events = []
            with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                              json={"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                                    "stream": True}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        events.append(line)
                        break
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait(10)
                events += [line for line in lines if line.startswith("data: ")]
            errors = [json.loads(e[6:])["error"]["message"] for e in events if '"error"' in e]
            assert errors and f"worker {w.address}" in errors[0], events[-3:]

            r = httpx.get(f"{base}/health")
            body = r.json()
            assert r.status_code == 503 and body["status"] == "degraded"
            down = [n for n in body["nodes"] if n["state"] == "down"]
            assert [n["address"] for n in down] == [w.address]
            refused = _chat(base)
            assert refused.status_code == 503 and w.address in refused.json()["error"]["message"]

            w.stop()
            back = WorkerProcess(tmp_path, port=w.port)
            w = back
            back.wait_ready()
            returned = time.monotonic()
            while True:
                r = _chat(base)
                if r.status_code == 200 or time.monotonic() - returned > 20:
                    break
                time.sleep(0.2)
            healed_in = time.monotonic() - returned
            assert r.status_code == 200, r.text
            assert healed_in < 15
            assert httpx.get(f"{base}/health").json()["status"] == "ready"
            from prometheus_client.parser import text_string_to_metric_families

            samples = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                       for s in f.samples}
            assert samples["dllama_worker_reconnects_total"] == 1
            assert _pid(base) == pid   # the same process
    finally:
        w.stop()


def test_api_notices_a_worker_lost_while_idle(split_model, smollm2_path, tmp_path):
    w = WorkerProcess(tmp_path).wait_ready()
    try:
        with running_server(split_model, "--tokenizer", smollm2_path, *COMMON, "--workers", w.address,
                            *KEY_ARGS) as base:
            w.proc.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 5
            status = None
            while time.monotonic() < deadline:
                status = httpx.get(f"{base}/health").json()["status"]
                if status == "degraded":
                    break
                time.sleep(0.1)
            assert status == "degraded"
    finally:
        w.stop()
