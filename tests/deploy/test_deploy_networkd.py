"""Role static_ip against a running systemd-networkd, on a host with a single interface that networkd
configures from a netplan-style file: the management address SSH comes in through is networkd's.

The host is a booted systemd container (systemd_hosts.NetworkdHosts); what is checked is what networkd and
the kernel report: the address arrives through a drop-in to netplan's file (a file of our own would sort
before it and take the interface over), the management address is never deleted while the play runs, a
second run (`deploy.yml --tags network`) runs only the checks and this role and changes nothing, and
networkd itself puts both addresses back after they are flushed (`networkctl reload`, `reconfigure`, a
restart). Both with the management address in the file (Address=) and as a DHCP lease.
"""

from __future__ import annotations

import os
import time

import pytest

from . import nshosts, systemd_hosts
from .nshosts import require

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

DROPIN = f"/etc/systemd/network/{systemd_hosts.NETPLAN_FILE}.d/50-dllama.conf"


@pytest.fixture(scope="module", params=["static", "dhcp"])
def nd(request):
    """One host whose management address is networkd's: from Address= in its file, or a DHCP lease."""
    missing = systemd_hosts.missing_prerequisites()
    require(not missing, "systemd test hosts need " + ", ".join(missing))
    require(nshosts.ansible_tool("ansible-playbook") is not None, "ansible-playbook is not installed")
    hosts = systemd_hosts.NetworkdHosts(n_hosts=1, dhcp=request.param == "dhcp")
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def kernel_addresses(hosts, host) -> str:
    """eth0's IPv4 addresses as the host's kernel has them (read from its namespace, not over SSH)."""
    return nshosts._run(["ip", "-n", host.netns, "-4", "-o", "addr", "show", "dev", "eth0"]).stdout


def wait_both(hosts, host, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = kernel_addresses(hosts, host)
        if (f"inet {host.mgmt_ip}/24" in out and f"inet {host.cluster_ip}/24" in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def network_file(hosts, host) -> str:
    r = hosts.ssh(host, "networkctl status --no-pager eth0")
    return next((line.split(":", 1)[1].strip() for line in r.stdout.splitlines()
                 if line.strip().startswith("Network File:")), "")


def inventory(hosts) -> str:
    return hosts.inventory(os.path.join(hosts.workdir, "nd.yml"))


def run_playbook(hosts, playbook: str = "network.yml", *args: str):
    return nshosts.run_playbook(hosts, playbook, inventory(hosts), *args, timeout=300)


def test_address_is_added_through_a_dropin_that_networkd_applies(nd):
    node = nd.hosts[0]
    netplan = node.path(f"/etc/systemd/network/{systemd_hosts.NETPLAN_FILE}")
    netplan_before = open(netplan).read()
    assert network_file(nd, node) == f"/etc/systemd/network/{systemd_hosts.NETPLAN_FILE}"
    nd.ssh(node, "nohup setsid ip monitor address >/var/tmp/addr-events 2>&1 </dev/null & "
                 "echo $! > /var/tmp/addr-monitor.pid")
    t0 = time.monotonic()
    try:
        # static_ip_stack left at auto: the host has ifupdown installed too, networkd is what runs.
        r = run_playbook(nd)
    finally:
        nd.ssh(node, "kill $(cat /var/tmp/addr-monitor.pid)", check=False)
    print(f"network.yml on the networkd host took {time.monotonic() - t0:.0f} s")
    assert r.returncode == 0, r.stdout[-4000:]
    events = open(node.path("/var/tmp/addr-events")).read()
    assert not [e for e in events.splitlines() if e.startswith("Deleted") and node.mgmt_ip in e], events
    assert f"inet {node.cluster_ip}/24" in events, events
    with open(node.path(DROPIN)) as f:
        assert f"\n[Network]\nAddress={node.cluster_ip}/24\n" in f.read()
    assert open(netplan).read() == netplan_before
    assert not os.path.exists(node.path("/etc/systemd/network/10-dllama-eth0.network"))
    assert not os.path.exists(node.path("/etc/network/interfaces.d/dllama-eth0"))
    out = kernel_addresses(nd, node)
    assert f"inet {node.mgmt_ip}/24" in out and f"inet {node.cluster_ip}/24" in out, out
    # Both answer: the management address and the new one (the controller has 10.213.1.1 on the same link).
    for address in (node.mgmt_ip, node.cluster_ip):
        assert nd.ssh(node, "hostname", address=address).stdout.strip() == "node1"
    nshosts.assert_network_part_changes_nothing(nd, inventory(nd))


# In this order: the reload takes the drop-in over (the play did not reload networkd on the interface it
# came in through), after which the link's own configuration has the cluster address.
@pytest.mark.parametrize("apply", ["networkctl reload", "networkctl reconfigure eth0",
                                   "systemctl restart systemd-networkd"])
def test_networkd_puts_both_addresses_back(nd, apply):
    node = nd.hosts[0]
    # Detached: flushing eth0 takes this SSH connection's address away until networkd puts it back.
    nd.ssh(node, "nohup setsid sh -c 'sleep 1; ip addr flush dev eth0; "
                 f"ip -4 -o addr show dev eth0 > /var/tmp/between; {apply}' >/dev/null 2>&1 </dev/null &")
    deadline = time.monotonic() + 30
    while not os.path.exists(node.path("/var/tmp/between")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert open(node.path("/var/tmp/between")).read().strip() == ""  # both really went
    out = wait_both(nd, node)
    assert f"inet {node.mgmt_ip}/24" in out and f"inet {node.cluster_ip}/24" in out, out
    assert nd.ssh(node, "hostname").stdout.strip() == "node1"
    nd.ssh(node, "rm /var/tmp/between")
