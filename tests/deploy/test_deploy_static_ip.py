"""Role static_ip on a host with a single interface, the one Ansible connects through (a Raspberry Pi
with one Ethernet port): the cluster address must never cut the controller off.

By default the address is added beside the management address, which keeps answering. With
static_ip_replace_management the host switches in the background and reverts by itself unless the
controller reaches it at the new address in time: both outcomes are run for real with ifupdown.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from . import nshosts
from .nshosts import require

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

UNREACHABLE = "10.213.7.11"   # a network the controller has no route to


@pytest.fixture(scope="module")
def one_host():
    missing = nshosts.missing_prerequisites()
    require(not missing, "namespace test hosts need " + ", ".join(missing))
    require(nshosts.ansible_tool("ansible-playbook") is not None, "ansible-playbook is not installed")
    hosts = nshosts.TestHosts(n_hosts=1, single_interface=True, prefix=f"dli{os.getpid() % 100000}")
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def addresses(hosts, host, address: str = "") -> str:
    return hosts.ssh(host, "ip -4 -o addr show dev eth0", address=address).stdout


def network(hosts, name: str, host_vars: dict | None = None, **extra):
    inv = hosts.inventory(os.path.join(hosts.workdir, f"{name}.yml"), host_vars={"node1": host_vars or {}})
    args = ["-e", json.dumps(extra)] if extra else []
    return nshosts.run_playbook(hosts, "network.yml", inv, *args, timeout=300)


def test_address_is_added_beside_the_management_address(one_host):
    node = one_host.hosts[0]
    main_before = open(node.path("/etc/network/interfaces")).read()
    # Every address change on the host while the play runs: the management address must never go, not
    # even for the moment an `ifdown; ifup` takes (with DHCP that moment loses the lease and the host).
    one_host.ssh(node, "nohup setsid ip monitor address >/run/addr-events 2>&1 </dev/null & "
                       "echo $! > /run/addr-monitor.pid")
    try:
        r = network(one_host, "add")
    finally:
        one_host.ssh(node, "kill $(cat /run/addr-monitor.pid)", check=False)
    assert r.returncode == 0, r.stdout[-4000:]
    events = open(node.path("/run/addr-events")).read()
    assert not [e for e in events.splitlines() if e.startswith("Deleted") and node.mgmt_ip in e], events
    assert f"inet {node.cluster_ip}/24" in events  # the monitor saw the run's own change
    out = addresses(one_host, node)
    assert f"inet {node.mgmt_ip}/24" in out and f"inet {node.cluster_ip}/24" in out, out
    assert open(node.path("/etc/network/interfaces")).read() == main_before
    with open(node.path("/etc/network/interfaces.d/dllama-eth0")) as f:
        assert f"iface eth0 inet static\n    address {node.cluster_ip}/24\n" in f.read()
    again = network(one_host, "add")
    assert again.returncode == 0, again.stdout[-4000:]
    assert nshosts.recap(again.stdout)["node1"]["changed"] == 0, again.stdout[-4000:]


def test_both_addresses_come_back_after_the_interface_restarts(one_host):
    node = one_host.hosts[0]
    # What a reboot does with ifupdown; detached, since it takes this SSH connection's address away.
    one_host.ssh(node, "nohup setsid sh -c 'sleep 1; ifdown eth0; ip -4 -o addr show dev eth0 > /run/between; "
                       "ifup -a' >/dev/null 2>&1 </dev/null &")
    deadline = time.monotonic() + 30
    while not os.path.exists(node.path("/run/between")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    assert open(node.path("/run/between")).read().strip() == ""  # both really went
    out = addresses(one_host, node)
    assert f"inet {node.mgmt_ip}/24" in out and f"inet {node.cluster_ip}/24" in out, out


def wait_for_log(path: str, text: str, timeout: float) -> str:
    """The log once `text` appears after its last "reverting" line (or anywhere when there is none)."""
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        if os.path.exists(path):
            log = open(path).read()
            if text in log[log.rfind("reverting"):]:
                return log
        time.sleep(1.0)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s:\n{log}")


def test_replace_reverts_when_the_new_address_is_unreachable(one_host):
    node = one_host.hosts[0]
    main_before = open(node.path("/etc/network/interfaces")).read()
    ours_before = open(node.path("/etc/network/interfaces.d/dllama-eth0")).read()
    r = network(one_host, "unreachable", {"dllama_address": UNREACHABLE},
                static_ip_replace_management=True, static_ip_confirm_timeout=25)
    assert r.returncode != 0
    assert f"node1 did not answer at {UNREACHABLE}" in " ".join(r.stdout.split()), r.stdout[-4000:]
    # The switch's own ifup, then after the deadline the revert's.
    wait_for_log(node.path("/etc/network/dllama-switch/switch.log"), "reverting\nifdown eth0", 60)
    log = wait_for_log(node.path("/etc/network/dllama-switch/switch.log"), "\nifup eth0: exit", 30)
    assert "confirmed: keeping" not in log
    out = addresses(one_host, node)
    assert f"inet {node.mgmt_ip}/24" in out and UNREACHABLE not in out, out
    assert open(node.path("/etc/network/interfaces")).read() == main_before
    assert open(node.path("/etc/network/interfaces.d/dllama-eth0")).read() == ours_before


def test_replace_switches_when_the_controller_reaches_the_new_address(one_host):
    node = one_host.hosts[0]
    r = network(one_host, "replace", static_ip_replace_management=True, static_ip_confirm_timeout=40)
    assert r.returncode == 0, r.stdout[-4000:]
    out = addresses(one_host, node, address=node.cluster_ip)
    assert f"inet {node.cluster_ip}/24" in out and node.mgmt_ip not in out, out
    time.sleep(1.0)
    assert "confirmed: keeping" in open(node.path("/etc/network/dllama-switch/switch.log")).read()
    assert "# dllama: iface eth0 inet static" in open(node.path("/etc/network/interfaces")).read()
    # With the inventory pointing at the new address, the next run finds nothing to do.
    again = network(one_host, "replaced", {"ansible_host": node.cluster_ip}, static_ip_replace_management=True)
    assert again.returncode == 0, again.stdout[-4000:]
    assert nshosts.recap(again.stdout)["node1"]["changed"] == 0, again.stdout[-4000:]
