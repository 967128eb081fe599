"""`ansible-playbook playbooks/deploy.yml` for real against two SSH hosts in network namespaces.

node1 is the root, node2 a worker (1 + 1 = 2 nodes). systemd is not PID 1 here, so the worker service is
tested in two honest halves: the unit file the role installs is checked by `systemd-analyze verify` and
enabled with `systemctl --root=/`, and its exact ExecStart line (with User, Environment,
NoNewPrivileges, Restart=on-failure) is run by `unit_runner.py`, a small supervisor, on the host.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import time

import pytest

from . import nshosts, unit_runner

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

UNIT = "/etc/systemd/system/dllama-worker.service"
VENV = "/opt/dllama/venv"
PORT = 9998


def again(hosts, inv, playbook="deploy.yml", *args):
    # The source tree may change under us (other work in progress): later runs reuse the built wheel.
    return nshosts.run_playbook(hosts, playbook, inv, "-e", '{"dllama_wheelhouse_build": false}', *args)


def test_package_imports_on_each_host(deployed):
    hosts, _ = deployed
    for host in hosts.hosts:
        r = hosts.ssh(host, f"{VENV}/bin/python -c 'import dllama, numba; print(dllama.__version__)'")
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", r.stdout.strip()), r.stdout
        # The venv was made from the distribution's Python, not the controller's.
        r = hosts.ssh(host, f"readlink -f {VENV}/bin/python")
        assert r.stdout.strip().startswith("/usr/bin/python3"), r.stdout
        # The root also has the API server's extra (fastapi, uvicorn), from the same wheelhouse.
        if host is hosts.hosts[0]:
            hosts.ssh(host, f"{VENV}/bin/python -c 'import fastapi, uvicorn, dllama.api.server'")
        cache = host.path("/opt/dllama/numba-cache")
        assert any(f.endswith((".nbi", ".nbc")) for _, _, fs in os.walk(cache) for f in fs), \
            f"numba cache on {host.name} is empty"


def test_static_address_is_added_beside_the_management_address(deployed):
    hosts, _ = deployed
    for host in hosts.hosts:
        # The hosts have one interface: Ansible came in through it and it still answers on both addresses.
        r = hosts.ssh(host, "ip -4 -o addr show dev eth0")
        assert f"inet {host.mgmt_ip}/24" in r.stdout and f"inet {host.cluster_ip}/24" in r.stdout, r.stdout
        with open(host.path("/etc/network/interfaces.d/dllama-eth0")) as f:
            stanza = f.read()
        assert "auto eth0" in stanza and f"address {host.cluster_ip}/24" in stanza
        with open(host.path("/etc/network/interfaces")) as f:
            assert f"iface eth0 inet static\n    address {host.mgmt_ip}/24" in f.read()


def test_worker_unit_is_valid_hardened_and_enabled(deployed):
    hosts, _ = deployed
    worker = hosts.hosts[1]
    r = hosts.ssh(worker, f"systemd-analyze verify {UNIT}", check=False)
    assert r.returncode == 0, r.stderr
    svc = unit_runner.read_service(worker.path(UNIT))  # the unit and its hardening drop-in
    assert svc["Restart"] == "on-failure" and "Nice" not in svc and svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == "" and svc["SystemCallFilter"] == "@system-service"
    assert svc["Environment"] == "NUMBA_CACHE_DIR=/opt/dllama/numba-cache"
    key = " --cluster-key-file /etc/dllama/cluster.key" if nshosts.supports_cluster_key() else ""
    assert svc["ExecStart"] == f"{VENV}/bin/dllama worker --host 0.0.0.0 --port {PORT} --nthreads 1 --spin-us 0{key}"
    assert os.path.islink(worker.path("/etc/systemd/system/multi-user.target.wants/dllama-worker.service"))
    # The root gets no worker service.
    assert not os.path.exists(hosts.hosts[0].path(UNIT))


def start_unit(hosts, host) -> None:
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit_runner.py")
    hosts.ssh(host, f"nohup setsid /usr/bin/python3 {runner} {UNIT} >/var/log/dllama-worker.log 2>&1 "
                    f"</dev/null & echo $! > /run/dllama-worker-runner.pid")


def probe_from_root(hosts, worker, timeout=90.0) -> dict:
    """The handshake, asked by the root host over the cluster network (the static addresses)."""
    import json

    code = (f"import json; from dllama.net import probe; "
            f"print(json.dumps(probe('{worker.cluster_ip}', {PORT}, 3.0)))")
    deadline = time.monotonic() + timeout
    while True:
        r = hosts.ssh(hosts.hosts[0], f"{VENV}/bin/python -c \"{code}\"", check=False)
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
        if time.monotonic() > deadline:
            log = open(worker.path("/var/log/dllama-worker.log")).read()[-3000:]
            raise AssertionError(f"no handshake from {worker.name}: {r.stderr[-1500:]}\nworker log:\n{log}")
        time.sleep(1.0)


def test_worker_runs_and_answers_handshake(deployed):
    hosts, _ = deployed
    worker = hosts.hosts[1]
    start_unit(hosts, worker)
    try:
        check_worker(hosts, worker)
    finally:
        hosts.ssh(worker, "kill $(cat /run/dllama-worker-runner.pid)", check=False)
    # As `systemctl stop`: the supervisor and the worker are gone.
    deadline = time.monotonic() + 15
    while "dllama" in hosts.ssh(worker, "ps -eo args").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "dllama" not in hosts.ssh(worker, "ps -eo args").stdout


def check_worker(hosts, worker):
    info = probe_from_root(hosts, worker)
    assert info["state"] == "idle"
    # The unit's User took effect on the process that answered, at the default priority.
    ps = hosts.ssh(worker, f"ps -o user=,ni=,args= -p {info['pid']}").stdout.split(None, 2)
    assert ps[0] == "dllama" and ps[1] == "0" and ps[2].startswith(f"{VENV}/bin/python"), ps
    # Restart=on-failure: a killed worker comes back with a new pid.
    hosts.ssh(worker, f"kill -9 {info['pid']}")
    time.sleep(0.5)
    again_info = probe_from_root(hosts, worker)
    assert again_info["pid"] != info["pid"]


def test_second_run_changes_nothing(deployed):
    hosts, inv = deployed
    r = again(hosts, inv)
    assert r.returncode == 0, r.stdout[-4000:]
    counts = nshosts.recap(r.stdout)
    assert set(counts) == {"node1", "node2"}
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in counts.values()), r.stdout[-6000:]
    # The re-applied static_ip role left both addresses in place.
    for host in hosts.hosts:
        out = hosts.ssh(host, "ip -4 -o addr show dev eth0").stdout
        assert f"inet {host.cluster_ip}/24" in out and f"inet {host.mgmt_ip}/24" in out, out


def test_check_mode_is_clean(deployed):
    hosts, inv = deployed
    r = again(hosts, inv, "deploy.yml", "--check")
    assert r.returncode == 0, r.stdout[-4000:]
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in nshosts.recap(r.stdout).values()), \
        r.stdout[-6000:]


def test_interrupted_or_damaged_install_is_repaired(deployed):
    hosts, inv = deployed
    root, worker = hosts.hosts
    # The worker as a run killed right after the wheel copy leaves it: the archive is there, unpacked
    # and installed is nothing. The root's package was damaged by hand since.
    hosts.ssh(worker, f"rm -rf /opt/dllama/wheels && {VENV}/bin/pip uninstall --quiet --yes dllama")
    hosts.ssh(root, f"echo 'raise ImportError(\"damaged\")' > $({VENV}/bin/python -c "
                    f"'import dllama, os; print(os.path.dirname(dllama.__file__))')/__init__.py")
    for host in hosts.hosts:
        assert hosts.ssh(host, f"{VENV}/bin/python -c 'import dllama'", check=False).returncode != 0
    r = again(hosts, inv)
    assert r.returncode == 0, r.stdout[-4000:]
    assert all(c["changed"] > 0 for c in nshosts.recap(r.stdout).values()), r.stdout[-4000:]
    import dllama

    for host in hosts.hosts:
        out = hosts.ssh(host, f"{VENV}/bin/python -c 'import dllama, numba; print(dllama.__version__)'").stdout
        assert out.strip() == dllama.__version__
    # Repaired for good: the next run finds nothing to do.
    r = again(hosts, inv)
    assert all(c["changed"] == 0 for c in nshosts.recap(r.stdout).values()), r.stdout[-4000:]


def test_node_care_units_are_valid_enabled_and_idempotent(deployed):
    hosts, inv = deployed
    node = hosts.hosts[1]
    play = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_care.yml")
    r = nshosts.run_playbook(hosts, play, inv)
    assert r.returncode == 0, r.stdout[-4000:]
    for unit, target in (("dllama-zram", "swap"), ("dllama-cpu-governor", "multi-user")):
        path = f"/etc/systemd/system/{unit}.service"
        verify = hosts.ssh(node, f"systemd-analyze verify {path}", check=False)
        assert verify.returncode == 0, verify.stderr
        assert os.path.islink(node.path(f"/etc/systemd/system/{target}.target.wants/{unit}.service"))
    svc = ini(node.path("/etc/systemd/system/dllama-zram.service"))["Service"]
    # systemd turns $$ into $: what the shell then runs must be a valid script.
    script = svc["ExecStart"].split("-c ", 1)[1].strip("'").replace("$$", "$")
    assert hosts.ssh(node, f"sh -n -c {shlex.quote(script)}", check=False).returncode == 0
    assert "--size " in script and "swapon --priority 100" in script
    if os.path.exists("/lib/systemd/systemd-timesyncd"):
        assert "NTP=10.213.0.1" in open(node.path("/etc/systemd/timesyncd.conf.d/dllama.conf")).read()
    again_r = nshosts.run_playbook(hosts, play, inv)
    assert nshosts.recap(again_r.stdout)[node.name]["changed"] == 0, again_r.stdout[-4000:]


def ini(path: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    assert cp.read(path), f"{path} is missing"
    return cp


def test_other_network_stacks_render_their_files(deployed):
    hosts, inv = deployed
    node = hosts.hosts[1]
    # The management interface eth0 as networkd would run it (DHCP), and a dedicated interface eth1.
    os.makedirs(node.path("/etc/systemd/network"), exist_ok=True)
    with open(node.path("/etc/systemd/network/20-wired.network"), "w") as f:
        f.write("[Match]\nName=eth0 en*\n\n[Network]\nDHCP=yes\n")
    nshosts._run(["ip", "-n", node.netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1peer"])
    # One run applies the role once per stack (tests/deploy/render_stacks.yml); without a running systemd
    # their handlers (nmcli, networkctl, dhcpcd restart) are skipped, so only the files are checked.
    play = os.path.join(os.path.dirname(os.path.abspath(__file__)), "render_stacks.yml")
    r = nshosts.run_playbook(hosts, play, inv, "--limit", node.name)
    assert r.returncode == 0, r.stdout[-4000:]
    net = "/etc/systemd/network"
    # networkd: a drop-in for the file that runs eth0, no file of its own that would sort first and win.
    dropin = ini(node.path(f"{net}/20-wired.network.d/50-dllama.conf"))
    assert dropin["Network"]["Address"] == f"{node.cluster_ip}/24"
    assert not os.path.exists(node.path(f"{net}/10-dllama-eth0.network"))
    own = ini(node.path(f"{net}/10-dllama-eth1.network"))
    assert own["Match"]["Name"] == "eth1" and own["Network"]["Address"] == "10.213.2.12/24"
    # dhcpcd: eth0 keeps DHCP (a hook adds the address), eth1 gets a static block.
    with open(node.path("/etc/dhcpcd.conf")) as f:
        dhcpcd = f.read()
    assert "interface eth0" not in dhcpcd and "interface eth1\nstatic ip_address=10.213.2.12/24\n" in dhcpcd
    with open(node.path("/etc/dhcpcd.exit-hook")) as f:
        assert f"ip addr replace {node.cluster_ip}/24 dev eth0" in f.read()
    # NetworkManager: a profile only for the dedicated interface, not one that outranks the DHCP profile.
    keyfile = node.path("/etc/NetworkManager/system-connections/dllama-eth1.nmconnection")
    assert os.stat(keyfile).st_mode & 0o777 == 0o600  # NetworkManager ignores keyfiles others can read
    nm = ini(keyfile)
    assert nm["connection"]["interface-name"] == "eth1" and nm["ipv4"]["method"] == "manual"
    assert nm["ipv4"]["address1"] == "10.213.2.12/24" and "autoconnect-priority" not in nm["connection"]
    assert not os.path.exists(node.path("/etc/NetworkManager/system-connections/dllama-eth0.nmconnection"))


def test_networkmanager_never_gets_a_new_profile_for_the_management_interface(deployed):
    hosts, inv = deployed
    node = hosts.hosts[1]
    # No NetworkManager runs here, so it cannot say which connection runs eth0: the role must refuse
    # rather than write a profile of its own for the interface Ansible comes in through.
    r = nshosts.run_playbook(hosts, "network.yml", inv, "--limit", node.name, "-e", "static_ip_stack=networkmanager")
    assert r.returncode != 0
    assert "the address is added to an existing connection, never put in a new profile" in " ".join(r.stdout.split())
    assert not os.path.exists(node.path("/etc/NetworkManager/system-connections/dllama-eth0.nmconnection"))
    assert f"inet {node.mgmt_ip}/24" in hosts.ssh(node, "ip -4 -o addr show dev eth0").stdout


def test_update_pushes_a_new_build(deployed, tmp_path):
    import json
    import uuid

    hosts, inv = deployed
    marker = uuid.uuid4().hex
    r = nshosts.run_playbook(hosts, "update.yml", inv, "-e", json.dumps(nshosts.new_build(tmp_path, marker)))
    assert r.returncode == 0, r.stdout[-4000:]
    assert all(c["changed"] > 0 for c in nshosts.recap(r.stdout).values())
    for host in hosts.hosts:
        out = hosts.ssh(host, f"{VENV}/bin/python -c 'import dllama._deploy_marker as m; print(m.VALUE)'").stdout
        assert out.strip() == marker


HUGE = {"name": "huge.m", "url": "http://127.0.0.1:9/huge.m", "size": 10**14}  # never fetched: preflight stops
BAD_INVENTORIES = {
    "worker without address": ({"node2": {"dllama_address": None}}, "dllama_address is not set for node2"),
    "duplicate addresses": ({"node2": {"dllama_address": "10.213.1.11"}},
                            "dllama_address 10.213.1.11 is set for more than one host: node1, node2"),
    "split weight": ({"node2": {"dllama_split_weight": "fast"}}, "dllama_split_weight of node2 is fast"),
    "port out of range": ({"node2": {"dllama_worker_port": 70000}}, "dllama_worker_port of node2 is 70000"),
    "spin not microseconds": ({"node2": {"dllama_worker_spin_us": "2ms"}},
                              "dllama_worker_spin_us of node2 is 2ms, not microseconds"),
    # Host checks: the hosts' real Python and memory, against a raised bar or an impossible model.
    "threads beyond the CPUs": ({"node2": {"dllama_worker_threads": 4096}},
                                "dllama_worker_threads of node2 is 4096, but it has"),
    "python too old": ({"node2": {"preflight_min_python": "3.99"}},
                       "dllama_python /usr/bin/python3 on node2 is Python 3."),
    "model larger than memory": ({"all": {"dllama_root_model_files": [HUGE]}},
                                 "its share of the model in dllama_root_model_files is about 47683716 MiB"),
    "model larger than the disk": ({"all": {"dllama_root_model_files": [HUGE], "preflight_memory": "ignore"}},
                                   "the model files in dllama_root_model_files take 95367432 MiB"),
}


@pytest.mark.parametrize("case", list(BAD_INVENTORIES))
def test_bad_inventory_fails_in_preflight(ns_hosts, case):
    import yaml

    changes, message = BAD_INVENTORIES[case]
    path = ns_hosts.inventory(os.path.join(ns_hosts.workdir, f"bad-{case.replace(' ', '-')}.yml"))
    with open(path) as f:
        inv = yaml.safe_load(f)
    workers = inv["all"]["children"]["dllama_workers"]["hosts"]
    for name, values in changes.items():
        entry = inv["all"]["vars"] if name == "all" else workers.setdefault(name, {"ansible_host": "10.213.0.99"})
        for key, value in values.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
    with open(path, "w") as f:
        yaml.safe_dump(inv, f)
    r = nshosts.run_playbook(ns_hosts, "deploy.yml", path)
    assert r.returncode != 0
    assert message in " ".join(r.stdout.split()), r.stdout[-3000:]
    assert "PLAY [Set up the cluster's nodes]" not in r.stdout  # stopped before touching any host
