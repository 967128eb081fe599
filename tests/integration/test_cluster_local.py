"""`dllama cluster up` on this machine (an inventory of `ansible_connection: local` nodes, no systemd
units): what the inventory leaves unset comes from the node, and a failing root takes the workers it
started down with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "random-4kv.m"
    subprocess.run([sys.executable, "-m", "dllama", "random-model", "--output", str(path), "--preset", "smollm2_135m",
                    "--n-heads", "4", "--n-kv-heads", "4", "--n-layers", "1"], check=True, capture_output=True)
    return str(path)


def inventory(tmp_path, model: str, tokenizer: str, port: int) -> str:
    """Two local nodes; no threads set (the node's CPU count), the warm numba cache of this checkout."""
    cache = os.environ.get("NUMBA_CACHE_DIR") or str(tmp_path / "numba")
    os.makedirs(cache, exist_ok=True)
    inv = {"all": {"vars": {"ansible_connection": "local", "dllama_cluster_state_dir": str(tmp_path / "state"),
                            "dllama_numba_cache_dir": cache},
                   "children": {
                       "dllama_root": {"hosts": {"r": {"dllama_address": "127.0.0.1", "dllama_root_model": model,
                                                       "dllama_root_tokenizer": tokenizer}}},
                       "dllama_workers": {"hosts": {"w": {"dllama_address": "127.0.0.1",
                                                          "dllama_worker_port": port}}}}}}
    path = tmp_path / "local.yml"
    path.write_text(yaml.safe_dump(inv))
    return str(path)


def cluster(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "dllama", "cluster", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_tokenizer_is_named_before_anything_starts(tmp_path, model):
    inv = inventory(tmp_path, model, str(tmp_path / "absent.t"), free_port())
    r = cluster("up", "-i", inv, "--run", "inference", "--prompt", "Hi", "--steps", "2")
    assert r.returncode == 2, r.stderr
    assert f"tokenizer not found on r: {tmp_path / 'absent.t'} (dllama_root_tokenizer)" in r.stderr
    assert "starting worker" not in r.stderr and not (tmp_path / "state" / "w.pid").exists()


def test_root_that_fails_stops_the_workers_it_started(tmp_path, model):
    bad = tmp_path / "garbage.t"
    bad.write_bytes(b"not a tokenizer" * 10)
    port = free_port()
    inv = inventory(tmp_path, model, str(bad), port)
    r = cluster("up", "-i", inv, "--run", "inference", "--prompt", "Hi", "--steps", "2")
    assert r.returncode != 0, r.stderr
    assert "w: ready" in r.stderr and "stopping the workers started: w" in r.stderr, r.stderr
    assert not (tmp_path / "state" / "w.pid").exists()
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_unset_threads_are_the_nodes_cpu_count_and_the_worker_uses_the_cache(tmp_path, model):
    inv = inventory(tmp_path, model, "", free_port())
    r = cluster("up", "-i", inv)
    try:
        assert r.returncode == 0, r.stderr
        pid = int((tmp_path / "state" / "w.pid").read_text())
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert argv[argv.index(b"--nthreads") + 1] == str(len(os.sched_getaffinity(0))).encode()
        assert argv[argv.index(b"--host") + 1] == b"127.0.0.1"  # a loopback node is not on the network
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert env[b"NUMBA_CACHE_DIR"] == yaml.safe_load(open(inv))["all"]["vars"]["dllama_numba_cache_dir"].encode()
        # The root's line printed for `--run none` has the same, resolved, threads.
        assert f"--nthreads {len(os.sched_getaffinity(0))}" in r.stderr
    finally:
        assert cluster("down", "-i", inv).returncode == 0


def test_status_shows_the_apis_own_state_and_names_the_lost_worker(tmp_path, model, smollm2_path):
    """`cluster status` reads the API's /health: ready while the cluster is whole; degraded, naming the worker
    and exit 1, once a worker is lost (the API notices an idle loss within its ping interval)."""
    import signal
    import time

    port = free_port()
    inv = inventory(tmp_path, model, smollm2_path, port)
    with open(inv) as f:
        data = yaml.safe_load(f)
    data["all"]["vars"]["dllama_root_api_port"] = api_port = free_port()
    with open(inv, "w") as f:
        yaml.safe_dump(data, f)
    r = cluster("up", "-i", inv, "--run", "api")
    try:
        assert r.returncode == 0, r.stderr
        st = cluster("status", "-i", inv)
        assert st.returncode == 0, st.stdout + st.stderr
        root_row = next(line for line in st.stdout.splitlines() if line.startswith("r "))
        assert root_row.split()[-1] == "ready" and "api" in root_row.split(), st.stdout
        os.kill(int((tmp_path / "state" / "w.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            st = cluster("status", "-i", inv)
            if "API degraded" in st.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert st.returncode == 1
        assert f"unhealthy: r: API degraded: 127.0.0.1:{port} down" in st.stderr, st.stderr
        assert "degraded" in next(line for line in st.stdout.splitlines() if line.startswith("r "))
        import urllib.request

        with pytest.raises(urllib.error.HTTPError):   # the API itself says the same
            urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=5)
    finally:
        assert cluster("down", "-i", inv).returncode == 0
