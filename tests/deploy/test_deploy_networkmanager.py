"""Role static_ip against a running NetworkManager, on a host with a single interface whose DHCP address
(NetworkManager's own "Wired connection 1", as on Raspberry Pi OS Bookworm) is the one SSH comes in through.

The host is a booted systemd container (systemd_hosts.NetworkManagerHosts) with NetworkManager unpacked
from its Debian packages into the container only. What is checked is what NetworkManager and the kernel
report: the address is added to the running connection (`+ipv4.addresses`, `device reapply`), which
keeps DHCP; no profile of our own appears; the management address is never deleted while the play runs;
both addresses answer; a second run changes nothing; and `nmcli connection up` (what a reboot or a
reconnect does) brings both back.
"""

from __future__ import annotations

import os
import time

import pytest

from . import nshosts, systemd_hosts
from .nshosts import require

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


@pytest.fixture(scope="module")
def nm():
    missing = systemd_hosts.missing_prerequisites()
    require(not missing, "systemd test hosts need " + ", ".join(missing))
    require(nshosts.ansible_tool("ansible-playbook") is not None, "ansible-playbook is not installed")
    debs, lacking = systemd_hosts.network_manager_debs()
    require(not lacking, f"NetworkManager's packages in {systemd_hosts.APT_ARCHIVES}: " + ", ".join(lacking) +
            " (apt-get install --download-only --no-install-recommends network-manager)")
    hosts = systemd_hosts.NetworkManagerHosts(n_hosts=1, debs=debs)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def nmcli(hosts, host, *args: str) -> str:
    return hosts.ssh(host, "nmcli --get-values " + " ".join(args)).stdout.strip()


def eth0_addresses(host) -> str:
    return nshosts._run(["ip", "-n", host.netns, "-4", "-o", "addr", "show", "dev", "eth0"]).stdout


def inventory(hosts) -> str:
    return hosts.inventory(os.path.join(hosts.workdir, "nm.yml"))


def run_playbook(hosts, playbook: str = "network.yml", *args: str):
    return nshosts.run_playbook(hosts, playbook, inventory(hosts), *args, timeout=300)


def test_address_is_added_to_the_running_dhcp_connection(nm):
    node = nm.hosts[0]
    conn = nmcli(nm, node, "GENERAL.CONNECTION", "device", "show", "eth0")
    assert conn and nmcli(nm, node, "ipv4.method", "connection", "show", f"'{conn}'") == "auto"
    profiles_before = nmcli(nm, node, "NAME,UUID", "connection", "show")
    nm.ssh(node, "nohup setsid ip monitor address >/var/tmp/addr-events 2>&1 </dev/null & "
                 "echo $! > /var/tmp/addr-monitor.pid")
    try:
        # static_ip_stack left at auto: ifupdown is installed too, NetworkManager is what runs.
        r = run_playbook(nm)
    finally:
        nm.ssh(node, "kill $(cat /var/tmp/addr-monitor.pid)", check=False)
    assert r.returncode == 0, r.stdout[-4000:]
    events = open(node.path("/var/tmp/addr-events")).read()
    assert not [e for e in events.splitlines() if e.startswith("Deleted") and node.mgmt_ip in e], events
    out = eth0_addresses(node)
    assert f"inet {node.mgmt_ip}/24" in out and f"inet {node.cluster_ip}/24" in out, out
    # The same connection, still DHCP, now with the cluster address; no profile was added.
    assert nmcli(nm, node, "GENERAL.CONNECTION", "device", "show", "eth0") == conn
    assert nmcli(nm, node, "ipv4.method", "connection", "show", f"'{conn}'") == "auto"
    assert nmcli(nm, node, "ipv4.addresses", "connection", "show", f"'{conn}'") == f"{node.cluster_ip}/24"
    assert nmcli(nm, node, "NAME,UUID", "connection", "show") == profiles_before
    keyfiles = node.path("/etc/NetworkManager/system-connections")
    assert not [f for f in (os.listdir(keyfiles) if os.path.isdir(keyfiles) else []) if f.startswith("dllama")]
    for address in (node.mgmt_ip, node.cluster_ip):
        assert nm.ssh(node, "hostname", address=address).stdout.strip() == "node1"
    nshosts.assert_network_part_changes_nothing(nm, inventory(nm))


def test_connection_up_brings_both_addresses_back(nm):
    node = nm.hosts[0]
    conn = nmcli(nm, node, "GENERAL.CONNECTION", "device", "show", "eth0")
    # Detached: taking the connection down and up drops this SSH connection's address for a moment.
    nm.ssh(node, f"nohup setsid sh -c 'sleep 1; ip addr flush dev eth0; nmcli connection up \"{conn}\"' "
                 ">/var/tmp/conn-up 2>&1 </dev/null &")
    deadline = time.monotonic() + 60
    while True:
        out = eth0_addresses(node)
        done = f"inet {node.mgmt_ip}/24" in out and f"inet {node.cluster_ip}/24" in out
        if (done and "successfully activated" in open(node.path("/var/tmp/conn-up")).read()) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done, (out, open(node.path("/var/tmp/conn-up")).read())
    assert nm.ssh(node, "hostname", address=node.cluster_ip).stdout.strip() == "node1"
