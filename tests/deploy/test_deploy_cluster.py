"""`dllama cluster up|status|down|logs` over SSH (Fabric) against the namespace hosts deployed by Ansible.

node1 is the root, node2 the worker. The model is a small random-weight model whose 4 KV heads split over
2 nodes (SmolLM2's 3 do not); its tokenizer is SmolLM2's GGUF, already on node1. With F32 buffers the two
nodes must generate exactly the tokens one node generates (the core invariant of tensor parallelism).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from . import nshosts
from .nshosts import model_file

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

PROMPT, STEPS = "The capital of France is", 12
STATE = "/run/dllama-cluster"   # per host (bind-mounted /run), not the shared /root


@pytest.fixture(scope="module")
def cluster(deployed, tmp_path_factory):
    """(hosts, inventory path, 1-node reference output)."""
    hosts, _ = deployed
    tmp = tmp_path_factory.mktemp("cluster")
    model = str(tmp / "random-4kv.m")
    subprocess.run([sys.executable, "-m", "dllama", "random-model", "--output", model, "--preset", "smollm2_135m",
                    "--n-heads", "12", "--n-kv-heads", "4", "--n-layers", "4"], check=True, capture_output=True)
    root = hosts.hosts[0]
    os.replace(model, root.path("/opt/dllama/models/random-4kv.m"))
    tokenizer = f"/opt/dllama/models/{os.path.basename(model_file())}"
    inv = hosts.inventory(os.path.join(hosts.workdir, "cluster.yml"), extra_vars={
        "dllama_root_model": "/opt/dllama/models/random-4kv.m", "dllama_root_tokenizer": tokenizer,
        "dllama_root_buffer_float_type": "f32", "dllama_cluster_state_dir": STATE,
        "dllama_cluster_key": nshosts.supports_cluster_key(),
    })
    ref = subprocess.run([sys.executable, "-m", "dllama", "inference", "--model", root.path("/opt/dllama/models/random-4kv.m"),
                          "--tokenizer", model_file(), "--prompt", PROMPT, "--steps", str(STEPS),
                          "--temperature", "0", "--json"], check=True, capture_output=True, text=True, timeout=300)
    yield hosts, inv, json.loads(ref.stdout.strip().splitlines()[-1])
    dllama_cluster(hosts, "down", inv)


def dllama_cluster(hosts, action, inv, *args, timeout=300):
    return hosts.in_controller([sys.executable, "-m", "dllama", "cluster", action, "-i", inv, *args],
                               check=False, timeout=timeout)


def worker_pid(hosts) -> int | None:
    r = hosts.ssh(hosts.hosts[1], f"cat {STATE}/node2.pid", check=False)
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip().isdigit() else None


def test_up_generates_the_one_node_tokens(cluster):
    hosts, inv, ref = cluster
    r = dllama_cluster(hosts, "up", inv, "--run", "inference", "--", "--prompt", PROMPT, "--steps", str(STEPS),
                       "--temperature", "0", "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["generated_ids"] == ref["generated_ids"] and out["text"] == ref["text"]
    assert out["sent_bytes_per_token"] > 0  # it really went through the worker
    assert "node2: ready" in r.stderr


def test_status_reports_all_healthy(cluster):
    hosts, inv, _ = cluster
    r = dllama_cluster(hosts, "status", inv)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["node1"][1:3] == ["root", "yes"]
    import dllama

    assert rows["node2"][1:6] == ["worker", "yes", "yes", dllama.__version__, "9998"]


def test_logs_are_prefixed_with_the_host(cluster):
    hosts, inv, _ = cluster
    r = dllama_cluster(hosts, "logs", inv, "-n", "20")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("node2 |")]
    assert any("listening on 0.0.0.0:9998" in line for line in lines), r.stdout


def test_killed_worker_is_named_by_status(cluster):
    hosts, inv, _ = cluster
    pid = worker_pid(hosts)
    assert pid is not None
    hosts.ssh(hosts.hosts[1], f"kill -9 {pid}")
    time.sleep(0.5)
    r = dllama_cluster(hosts, "status", inv)
    assert r.returncode == 1
    assert "node2: worker not answering on port 9998" in r.stderr


def test_up_api_then_down_leaves_no_process_and_is_idempotent(cluster):
    hosts, inv, _ = cluster
    root, worker = hosts.hosts
    r = dllama_cluster(hosts, "up", inv, "--run", "api")
    assert r.returncode == 0, r.stderr
    pid = worker_pid(hosts)
    api_pid = int(hosts.ssh(root, f"cat {STATE}/root-api.pid").stdout)
    # with the API key the roles made (cluster up gives it to the API it starts, as the unit gets it)
    models = hosts.ssh(root, "/opt/dllama/venv/bin/python -c \"import urllib.request; "
                             "key = open('/etc/dllama/api.env').read().strip().split('=', 1)[1]; "
                             "req = urllib.request.Request('http://127.0.0.1:9990/v1/models', "
                             "headers={'Authorization': 'Bearer ' + key}); "
                             "print(urllib.request.urlopen(req).read().decode())\"")
    assert "random-4kv" in models.stdout, models.stdout
    rows = {line.split()[0]: line.split() for line in dllama_cluster(hosts, "status", inv).stdout.splitlines()[1:]}
    assert rows["node1"][3] == "api" and rows["node2"][-1].startswith("10.213.1.11:")  # serving the API's root
    for _ in range(2):
        r = dllama_cluster(hosts, "down", inv)
        assert r.returncode == 0, r.stderr
    assert hosts.ssh(worker, f"kill -0 {pid}", check=False).returncode != 0
    assert hosts.ssh(root, f"kill -0 {api_pid}", check=False).returncode != 0
    assert worker_pid(hosts) is None
    assert "dllama" not in hosts.ssh(worker, "ps -eo args").stdout
    assert "main_api" not in hosts.ssh(root, "ps -eo args").stdout


def test_up_with_an_unreachable_host_starts_nothing(cluster):
    hosts, inv, _ = cluster
    with open(inv) as f:
        data = yaml.safe_load(f)
    workers = data["all"]["children"]["dllama_workers"]["hosts"]
    # 4 nodes: node2 twice (two ports) and a host nobody answers for.
    workers["node2b"] = {**workers["node2"], "dllama_worker_port": 9997}
    workers["ghost"] = {"ansible_host": "10.213.0.99", "dllama_address": "10.213.1.99"}
    bad = os.path.join(hosts.workdir, "unreachable.yml")
    with open(bad, "w") as f:
        yaml.safe_dump(data, f)
    t0 = time.monotonic()
    r = dllama_cluster(hosts, "up", bad, "--connect-timeout", "3", "--timeout", "20")
    took = time.monotonic() - t0
    assert r.returncode == 2
    assert "unreachable: ghost" in r.stderr and "nothing was started" in r.stderr
    assert took < 60, f"took {took:.0f} s"
    assert worker_pid(hosts) is None
    assert "dllama worker" not in hosts.ssh(hosts.hosts[1], "ps -eo args").stdout
