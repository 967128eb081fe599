"""The roles' services under a real systemd (PID 1 in a `systemd-nspawn` container per host).

node1 is the root with the dllama-api unit, node2 a worker; both deployed by `playbooks/deploy.yml` with
the keys and the nftables table on. What is checked is what systemd and the kernel report, not what our
templates say: unit states and main pids (`systemctl show`), the sandbox on the live process
(/proc/PID/status), an HTTP request answered through the API and the worker, `dllama cluster
status|down|up|logs` against the units, `update.yml` restarting what runs, and the firewall dropping a
connection from anywhere but the root.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid

import pytest

from . import nshosts, systemd_hosts
from .nshosts import model_file, require

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

PORT, API_PORT = 9998, 9990
VENV = "/opt/dllama/venv"
# What a run limited to the services' tags (keys, firewall) may touch.
SERVICE_ROLES = {"preflight", "dllama_cluster", "dllama_worker", "dllama_root"}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(hosts, inventory, deploy output) after one deploy.yml onto two booted systemd containers."""
    missing = systemd_hosts.missing_prerequisites()
    require(not missing, "systemd test hosts need " + ", ".join(missing))
    require(nshosts.ansible_tool("ansible-playbook") is not None, "ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("systemd")
    model = str(tmp / "random-4kv.m")
    # 4 KV heads split over 2 nodes (SmolLM2's 3 do not); SmolLM2's tokenizer.
    subprocess.run([sys.executable, "-m", "dllama", "random-model", "--output", model, "--preset", "smollm2_135m",
                    "--n-heads", "12", "--n-kv-heads", "4", "--n-layers", "4"], check=True, capture_output=True)
    tokenizer = model_file()
    hosts = systemd_hosts.SystemdHosts(n_hosts=2)
    try:
        hosts.start()
        inv = hosts.inventory(os.path.join(hosts.workdir, "sd.yml"), extra_vars={
            "dllama_root_model_files": [{"name": "random-4kv.m", "src": model},
                                        {"name": os.path.basename(tokenizer), "src": tokenizer}],
            "dllama_root_tokenizer": f"/opt/dllama/models/{os.path.basename(tokenizer)}",
            "dllama_root_buffer_float_type": "f32", "dllama_root_max_seq_len": 256,
            "dllama_root_api": True, "dllama_cluster_firewall": True, "dllama_worker_port": PORT,
            "dllama_cluster_key": nshosts.supports_cluster_key(),
            "dllama_cluster_state_dir": "/run/dllama-cluster",
            # timesyncd never runs in a container (ConditionVirtualization=!container; masked here too).
            "dllama_node_time_sync": False,
        })
        r = nshosts.run_playbook(hosts, "deploy.yml", inv)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        yield hosts, inv, r.stdout
    finally:
        hosts.stop()


def show(hosts, host, unit: str) -> dict:
    r = hosts.ssh(host, f"systemctl show {unit} -p ActiveState -p MainPID -p NRestarts")
    return dict(line.split("=", 1) for line in r.stdout.split())


def cluster(hosts, action, inv, *args, timeout=300):
    return hosts.in_controller([sys.executable, "-m", "dllama", "cluster", action, "-i", inv, *args],
                               check=False, timeout=timeout)


def api_key(hosts) -> str:
    r = hosts.ssh(hosts.hosts[0], "cat /etc/dllama/api.env")
    return r.stdout.strip().split("=", 1)[1]


def chat(hosts, key: str | None, timeout: float = 240) -> tuple[int, dict]:
    """POST /v1/chat/completions on the root (loopback there), until the API listens and has loaded the model
    (it listens at once and answers 503 while loading); (status, body)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    body = {"model": "random-4kv", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "temperature": 0}
    code = (
        "import json, sys, time, urllib.request, urllib.error\n"
        f"req = urllib.request.Request('http://127.0.0.1:{API_PORT}/v1/chat/completions', "
        f"data={json.dumps(json.dumps(body))}.encode(), headers={headers!r})\n"
        f"end = time.monotonic() + {timeout}\n"
        "while True:\n"
        "    try:\n"
        "        r = urllib.request.urlopen(req, timeout=120); print(r.status); print(r.read().decode()); break\n"
        "    except urllib.error.HTTPError as e:\n"
        "        if e.code == 503 and time.monotonic() < end: time.sleep(1); continue   # still loading\n"
        "        print(e.code); print(e.read().decode()); break\n"
        "    except OSError:\n"
        "        if time.monotonic() > end: raise\n"
        "        time.sleep(1)\n"
    )
    r = hosts.ssh(hosts.hosts[0], f"{VENV}/bin/python -c {shlex.quote(code)}", timeout=timeout + 60)
    status, text = r.stdout.split("\n", 1)
    return int(status), json.loads(text)


def test_units_run_as_pid1_services_with_their_sandbox(sd):
    hosts, _, _ = sd
    for host, unit in ((hosts.hosts[1], "dllama-worker"), (hosts.hosts[0], "dllama-api")):
        assert hosts.ssh(host, "cat /proc/1/comm").stdout.strip() == "systemd"
        state = show(hosts, host, unit)
        assert state["ActiveState"] == "active", (unit, state)
        pid = state["MainPID"]
        status = dict(re.findall(r"^(\w+):\s*(.*)$", hosts.ssh(host, f"cat /proc/{pid}/status").stdout, re.M))
        user = hosts.ssh(host, f"ps -o user= -p {pid}").stdout.strip()
        # What the kernel enforces on the running process: no privileges to gain, an empty capability
        # bounding set, a seccomp filter.
        assert user == "dllama" and status["NoNewPrivs"] == "1", (unit, user, status)
        assert int(status["CapBnd"], 16) == 0 and status["Seccomp"] == "2", (unit, status)


def test_api_answers_through_the_worker_and_wants_its_key(sd):
    hosts, _, _ = sd
    key = api_key(hosts)
    assert len(key) == 48
    status, body = chat(hosts, key)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"], body
    assert chat(hosts, None)[0] == 401
    # The worker serves the API's root, over the cluster network.
    r = cluster(hosts, "status", sd[1])
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["node1"][3] == "api(systemd)", r.stdout
    assert rows["node2"][1:4] == ["worker", "yes", "yes"] and rows["node2"][-1].startswith("10.213.1.11:"), r.stdout


def test_keys_are_made_once_kept_on_the_controller_and_never_logged(sd):
    hosts, inv, deploy_out = sd
    secrets = os.path.join(hosts.workdir, "secrets", "sd")
    for name in ("cluster.key", "api.key"):
        assert os.stat(os.path.join(secrets, name)).st_mode & 0o777 == 0o600
    with open(os.path.join(secrets, "cluster.key")) as f:
        cluster_key = f.read().strip()
    assert re.fullmatch(r"[0-9a-fA-F]{64}", cluster_key)
    for host in hosts.hosts:
        assert hosts.ssh(host, "stat -c '%a %U %G' /etc/dllama/cluster.key").stdout.split() == ["640", "root", "dllama"]
        assert hosts.ssh(host, "cat /etc/dllama/cluster.key").stdout.strip() == cluster_key
    assert hosts.ssh(hosts.hosts[0], "stat -c '%a %U %G' /etc/dllama/api.env").stdout.split() == ["640", "root", "dllama"]
    assert cluster_key not in deploy_out and api_key(hosts) not in deploy_out
    # A second run neither makes new keys nor changes anything.
    r = nshosts.run_playbook(hosts, "deploy.yml", inv, "-e", '{"dllama_wheelhouse_build": false}')
    assert r.returncode == 0, r.stdout[-4000:]
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in nshosts.recap(r.stdout).values()), r.stdout[-6000:]
    with open(os.path.join(secrets, "cluster.key")) as f:
        assert f.read().strip() == cluster_key


def test_firewall_lets_only_the_root_reach_the_worker(sd):
    hosts, _, _ = sd
    worker = hosts.hosts[1]
    rules = hosts.ssh(worker, "nft list table inet dllama").stdout
    # nft prints a one-element set without braces.
    assert re.search(rf"tcp dport {PORT} ip saddr {{? ?10\.213\.1\.11 ?}}? accept", rules), rules
    # The controller's own address on the cluster network (10.213.1.1) is not the root's: dropped.
    probe = ("import socket; s = socket.socket(); s.settimeout(3)\n"
             f"try:\n    s.connect(('{worker.cluster_ip}', {PORT})); print('open')\n"
             "except OSError as e:\n    print(type(e).__name__)")
    r = hosts.in_controller([sys.executable, "-c", probe])
    assert r.stdout.strip() in ("TimeoutError", "timeout"), r.stdout
    # The root gets through (the API's worker above, and a fresh handshake now).
    code = f"from dllama.net import probe; print(probe('{worker.cluster_ip}', {PORT}, 3.0)['version'])"
    assert hosts.ssh(hosts.hosts[0], f"{VENV}/bin/python -c \"{code}\"").stdout.strip()


def test_tag_firewall_puts_back_only_the_table(sd):
    hosts, inv, _ = sd
    worker = hosts.hosts[1]
    hosts.ssh(worker, "nft delete table inet dllama")
    r = nshosts.run_playbook(hosts, "deploy.yml", inv, "--tags", "firewall")
    assert r.returncode == 0, r.stdout[-4000:]
    # Nothing of the other parts (install, node, network, the units themselves).
    assert {"dllama_cluster"} <= nshosts.roles_run(r.stdout) <= SERVICE_ROLES, r.stdout[-6000:]
    counts = nshosts.recap(r.stdout)
    assert counts["node2"]["changed"] >= 1 and counts["node1"]["changed"] == 0, r.stdout[-4000:]
    assert f"tcp dport {PORT}" in hosts.ssh(worker, "nft list table inet dllama").stdout


def test_tag_keys_puts_the_key_back_and_restarts_the_worker(sd):
    hosts, inv, _ = sd
    worker = hosts.hosts[1]
    key = hosts.ssh(worker, "cat /etc/dllama/cluster.key").stdout
    before = show(hosts, worker, "dllama-worker")["MainPID"]
    hosts.ssh(worker, "echo 00 > /etc/dllama/cluster.key")
    r = nshosts.run_playbook(hosts, "deploy.yml", inv, "--tags", "keys")
    assert r.returncode == 0, r.stdout[-4000:]
    assert {"dllama_cluster", "dllama_worker"} <= nshosts.roles_run(r.stdout) <= SERVICE_ROLES, r.stdout[-6000:]
    assert hosts.ssh(worker, "cat /etc/dllama/cluster.key").stdout == key
    after = show(hosts, worker, "dllama-worker")
    assert after["ActiveState"] == "active" and after["MainPID"] != before, (before, after)
    assert show(hosts, hosts.hosts[0], "dllama-api")["ActiveState"] == "active"

def test_security_exposure_of_the_units(sd):
    hosts, _, _ = sd
    for host, unit in ((hosts.hosts[1], "dllama-worker"), (hosts.hosts[0], "dllama-api")):
        r = hosts.ssh(host, f"systemd-analyze security --no-pager {unit}.service", check=False)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
        assert m, r.stdout[-2000:] + r.stderr
        print(f"systemd-analyze security {unit}: {m.group(1)}")
        assert float(m.group(1)) <= 3.0, r.stdout  # "OK" or better in systemd's words


def test_update_restarts_what_runs(sd, tmp_path):
    hosts, inv, _ = sd
    root, worker = hosts.hosts
    before = {"api": show(hosts, root, "dllama-api")["MainPID"], "worker": show(hosts, worker, "dllama-worker")["MainPID"]}
    build = nshosts.new_build(tmp_path, uuid.uuid4().hex)
    r = nshosts.run_playbook(hosts, "update.yml", inv, "-e", json.dumps(build))
    assert r.returncode == 0, r.stdout[-4000:]
    after = {"api": show(hosts, root, "dllama-api"), "worker": show(hosts, worker, "dllama-worker")}
    for name, state in after.items():
        assert state["ActiveState"] == "active" and state["MainPID"] != before[name], (name, before, after)
    assert chat(hosts, api_key(hosts))[0] == 200


def test_cluster_down_stops_the_units_and_up_starts_them(sd):
    hosts, inv, _ = sd
    root, worker = hosts.hosts
    r = cluster(hosts, "down", inv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert show(hosts, root, "dllama-api")["ActiveState"] == "inactive"
    assert show(hosts, worker, "dllama-worker")["ActiveState"] == "inactive"
    assert "dllama" not in hosts.ssh(worker, "ps -eo args").stdout
    # A stopped service stays stopped through update.yml ("restarts what runs").
    r = nshosts.run_playbook(hosts, "update.yml", inv, "-e", '{"dllama_wheelhouse_build": false}')
    assert r.returncode == 0, r.stdout[-4000:]
    assert show(hosts, worker, "dllama-worker")["ActiveState"] == "inactive"
    assert show(hosts, root, "dllama-api")["ActiveState"] == "inactive"
    r = cluster(hosts, "up", inv, "--run", "api")
    assert r.returncode == 0, r.stdout + r.stderr
    assert show(hosts, worker, "dllama-worker")["ActiveState"] == "active"
    assert show(hosts, root, "dllama-api")["ActiveState"] == "active"
    assert chat(hosts, api_key(hosts))[0] == 200
    # The root's one-shot run would fight the API for the workers: refused, nothing stopped.
    r = cluster(hosts, "up", inv, "--run", "inference", "--prompt", "Hi", "--steps", "2")
    assert r.returncode == 2 and "dllama-api runs on node1 (systemd)" in r.stderr, r.stderr
    logs = cluster(hosts, "logs", inv, "-n", "200")
    assert any(line.startswith("node2 |") and "listening on 0.0.0.0:9998" in line
               for line in logs.stdout.splitlines()), logs.stdout[-3000:]
    r = cluster(hosts, "down", inv)
    assert r.returncode == 0 and show(hosts, root, "dllama-api")["ActiveState"] == "inactive"
    # The inventory names no dllama_root_model (only the files to copy, as docs/deploy.md does): the
    # one-shot root runs the model and tokenizer role dllama_root recorded on the root.
    r = cluster(hosts, "up", inv, "--run", "inference", "--prompt", "Hi", "--steps", "3", "--json")
    try:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["sent_bytes_per_token"] > 0
    finally:
        assert cluster(hosts, "down", inv).returncode == 0
