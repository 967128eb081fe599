"""Test hosts that boot systemd as PID 1: one `systemd-nspawn --boot` container per network namespace.

The network is nshosts' (a controller namespace with two bridges, each host's eth0 with its management
address and an unconfigured eth1). Each container's root is an overlay: this machine's / read-only below,
a tmpfs above that takes every write, so the playbooks install into their real paths (/opt, /etc/systemd)
and nothing reaches this machine's files. Before boot the tmpfs gets the host's name, SSH key, an empty
resolv.conf and masks for this machine's own services (a database, timers) that a test host must not run.

NetworkdHosts: the same with a single interface that a running systemd-networkd configures (from Address=
in a netplan-style file, or a DHCP lease from networkd's DHCP server in one more container).

Teardown: SIGTERM to systemd-nspawn (the container powers off), SIGKILL of the container's init if that
takes too long, then the mounts and the namespace go.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from . import nshosts
from .nshosts import Host, TestHosts, _run

NSPAWN = "systemd-nspawn"
# This machine's enabled services that have no business in a test host.
MASKED = ("postgresql.service", "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer",
          "man-db.timer", "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer",
          "systemd-timesyncd.service", "getty@tty1.service")


def missing_prerequisites() -> list[str]:
    missing = nshosts.missing_prerequisites()
    missing += [] if shutil.which(NSPAWN) else [f"{NSPAWN} (apt package systemd-container)"]
    return missing


class SystemdHost(Host):
    def path(self, inside: str) -> str:
        """The controller-side path of any file the host sees at `inside` (its merged root)."""
        return os.path.join(self.workdir, "root") + inside


@dataclass
class SystemdHosts(TestHosts):
    """Like TestHosts, but each host is a booted systemd container."""

    # Names of its own: nshosts' hosts of the same test run (a session fixture) may be up beside these.
    prefix: str = field(default_factory=lambda: f"dls{os.getpid() % 100000}")
    host_class = SystemdHost
    masked = MASKED  # not a field: units the hosts must not run
    # Directories laid over this machine's / in every container (software this machine does not run).
    layers: tuple[str, ...] = ()

    def _make_host_dirs(self, host: Host) -> None:
        upper_fs, merged = os.path.join(host.workdir, "rw"), host.path("")
        os.makedirs(upper_fs)
        os.makedirs(merged)
        # The upper layer on a file system of its own: overlayfs refuses an upper directory inside its lower.
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", upper_fs])
        os.makedirs(os.path.join(upper_fs, "upper"))
        os.makedirs(os.path.join(upper_fs, "work"))
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={':'.join((*self.layers, '/'))},upperdir={upper_fs}/upper,workdir={upper_fs}/work", merged])

        def write(inside: str, text: str, mode: int = 0o644) -> None:
            path = host.path(inside)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, mode)

        write("/etc/hostname", host.name + "\n")
        write("/etc/hosts", f"127.0.0.1 localhost\n{host.mgmt_ip} {host.name}\n")
        write("/etc/resolv.conf", "")  # no nameserver: lookups fail at once instead of timing out
        with open(self.key + ".pub") as f:
            write("/root/.ssh/authorized_keys", f.read(), 0o600)
        # A plain shell for root: this machine's shell start-up files (a pyenv rehash under a lock that
        # every container shares through the lower layer) made each SSH command wait a minute.
        for name in ("/root/.bashrc", "/root/.profile"):
            write(name, "")
        write("/etc/ssh/sshd_config.d/dllama-test.conf",
              f"ListenAddress {host.mgmt_ip}\nUseDNS no\nMaxSessions 50\nMaxStartups 50\n")
        for unit in self.masked:
            link = host.path(f"/etc/systemd/system/{unit}")
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink("/dev/null", link)
        shutil.rmtree(host.path("/etc/network/interfaces.d"), ignore_errors=True)
        os.makedirs(host.path("/etc/network/interfaces.d"))

    def _start_sshd(self, host: Host) -> None:
        """Boot the container: its systemd starts sshd (ssh.service)."""
        host.sshd_log = os.path.join(self.workdir, f"{host.name}-boot.log")
        with open(host.sshd_log, "w") as log:
            # nspawn mounts the container's /sys from its own: that must be a sysfs mounted inside the
            # namespace (showing the host's interfaces, not this machine's), with this machine's cgroup
            # file systems moved over to it (nspawn needs them). CAP_NET_ADMIN: nspawn keeps it only for a
            # network it makes itself, and the firewall role needs it, as on a real host.
            cg = os.path.join(host.workdir, "cgroup")
            os.makedirs(cg)
            nspawn = [NSPAWN, "--quiet", "--boot", "--register=no", "--keep-unit", f"--machine={host.netns}",
                      f"--directory={host.path('/')}", f"--network-namespace-path=/run/netns/{host.netns}",
                      "--capability=CAP_NET_ADMIN", "--console=read-only"]
            script = (f"mount --rbind /sys/fs/cgroup {cg} && umount -l /sys && mount -t sysfs sysfs /sys && "
                      f"mount --move {cg} /sys/fs/cgroup && exec {' '.join(nspawn)}")
            host.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _wait_ssh(self, host: Host, timeout: float = 90.0) -> None:
        super()._wait_ssh(host, timeout)

    def stop(self) -> None:
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)
        for host in self.hosts:
            if host.proc is None:
                continue
            try:
                host.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                init = _run(["pgrep", "-P", str(host.proc.pid)], check=False).stdout.split()
                for pid in init:
                    os.kill(int(pid), signal.SIGKILL)  # PID 1 of the container: its namespace goes with it
                host.proc.kill()
                host.proc.wait(timeout=10)
        for host in self.hosts:
            for mount in ("root", "rw"):
                _run(["umount", "-l", os.path.join(host.workdir, mount)], check=False)
        super().stop()


# The name netplan gives the file it writes for eth0: a drop-in must add to it, a file of our own would
# sort before it and win.
NETPLAN_FILE = "10-netplan-eth0.network"


@dataclass
class NetworkdHosts(SystemdHosts):
    """Booted systemd containers with a single interface, eth0, that a running systemd-networkd configures
    from a .network file as netplan writes it: the management address SSH comes in through is networkd's.

    dhcp=False: the file gives the address (Address=). dhcp=True: the file says DHCP=ipv4 and the address
    is a lease from one more container, "dhcpd", whose networkd serves DHCP on the management network
    (a static lease for each host's fixed MAC address, so the address is still known in advance)."""

    single_interface: bool = True
    dhcp: bool = False
    server: Host | None = None
    # ifupdown's boot-time service off: networkd is the one owner of eth0.
    masked = MASKED + ("networking.service",)

    @staticmethod
    def mac(host: Host) -> str:
        return f"02:00:00:00:00:{host.index:02x}"

    def _make_controller(self) -> None:
        super()._make_controller()
        if self.dhcp:
            # Index 0: its veth and namespace names and address (.10) are apart from the hosts' (1...).
            self.server = self.host_class("dhcpd", f"{self.prefix}h0", 0, os.path.join(self.workdir, "dhcpd"))
            self._make_host(self.server)

    def _network_file(self, host: Host) -> str:
        if host is self.server:
            leases = "".join(f"\n[DHCPServerStaticLease]\nMACAddress={self.mac(self.host_class('', '', i, ''))}\n"
                             f"Address={nshosts.MGMT_NET}.{10 + i}\n" for i in range(1, self.n_hosts + 1))
            return (f"[Match]\nName=eth0\n\n[Network]\nAddress={host.mgmt_ip}/24\nDHCPServer=yes\n\n"
                    "[DHCPServer]\nPoolOffset=100\nPoolSize=20\nEmitDNS=no\nEmitRouter=no\n" + leases)
        if self.dhcp:
            # As netplan writes `dhcp-identifier: mac`: the server's static lease is found by the MAC.
            return "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n\n[DHCPv4]\nClientIdentifier=mac\n"
        return f"[Match]\nName=eth0\n\n[Network]\nAddress={host.mgmt_ip}/24\n"

    def _make_host_dirs(self, host: Host) -> None:
        super()._make_host_dirs(host)
        _run(["ip", "-n", host.netns, "link", "set", "eth0", "address", self.mac(host)])
        with open(host.path(f"/etc/systemd/network/{NETPLAN_FILE}"), "w") as f:
            f.write(self._network_file(host))
        # networkd on, as `systemctl enable` links it.
        for unit, target in (("systemd-networkd.service", "multi-user.target"),
                             ("systemd-networkd.socket", "sockets.target")):
            wants = host.path(f"/etc/systemd/system/{target}.wants")
            os.makedirs(wants, exist_ok=True)
            os.symlink(f"/lib/systemd/system/{unit}", os.path.join(wants, unit))
        # sshd may start before networkd has put the address on eth0: listen on any address.
        with open(host.path("/etc/ssh/sshd_config.d/dllama-test.conf"), "w") as f:
            f.write("UseDNS no\nMaxSessions 50\nMaxStartups 50\n")

    def stop(self) -> None:
        if self.server is not None:
            self.hosts.append(self.server)  # torn down as the hosts are
            self.server = None
        super().stop()


NM_PACKAGE = "network-manager"
APT_ARCHIVES = "/var/cache/apt/archives"


def network_manager_debs() -> tuple[list[str], list[str]]:
    """(the .deb files NetworkManager and the libraries this machine lacks come in, the packages whose
    file is not in apt's cache). `apt-get install --download-only --no-install-recommends network-manager`
    fetches them without installing anything: NetworkManager never runs on this machine, whose network it
    would take over."""
    if _run(["dpkg-query", "--show", "--showformat=${Status}", NM_PACKAGE], check=False).stdout == \
            "install ok installed":
        return [], []  # the containers have this machine's own
    r = _run(["apt-get", "install", "--simulate", "--no-install-recommends", NM_PACKAGE], check=False)
    packages = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("Inst ")]
    if r.returncode != 0 or NM_PACKAGE not in packages:
        return [], [NM_PACKAGE]
    found, missing = [], []
    for name in packages:
        debs = sorted(f for f in os.listdir(APT_ARCHIVES) if f.startswith(name + "_") and f.endswith(".deb"))
        if debs:
            found.append(os.path.join(APT_ARCHIVES, debs[-1]))
        else:
            missing.append(name)
    return found, missing


def unpack_debs(debs: list[str], dest: str) -> None:
    """The packages' files under dest (no maintainer scripts run). Where this machine's /lib is a link to
    usr/lib, the packages' /lib goes there too: a /lib directory in an overlay layer would hide the link."""
    for deb in debs:
        _run(["dpkg-deb", "--extract", deb, dest])
    for top in ("lib", "bin", "sbin", "lib64"):
        inside = os.path.join(dest, top)
        if os.path.islink("/" + top) and os.path.isdir(inside) and not os.path.islink(inside):
            _run(["cp", "-a", inside + "/.", os.path.join(dest, "usr", top)])
            shutil.rmtree(inside)


@dataclass
class NetworkManagerHosts(NetworkdHosts):
    """Booted systemd containers whose single interface, eth0, a running NetworkManager configures by DHCP
    (the lease from the "dhcpd" container's networkd, as NetworkdHosts), through the connection it makes
    for a wired interface nothing else configures: Raspberry Pi OS Bookworm's "Wired connection 1".
    NetworkManager comes from its .deb files (network_manager_debs), unpacked into a layer of the
    containers' overlay only."""

    dhcp: bool = True
    debs: list[str] = field(default_factory=list)

    def _make_controller(self) -> None:
        # On a file system of its own, as the upper layer: overlayfs refuses a layer inside another (/).
        layer = os.path.join(self.workdir, "network-manager")
        os.makedirs(layer)
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", layer])
        self.layers = (layer,)
        unpack_debs(self.debs, layer)
        super()._make_controller()

    def stop(self) -> None:
        super().stop()  # the containers and their overlays go first; rm stopped at the layer's mount
        for layer in self.layers:
            _run(["umount", "-l", layer], check=False)
        if self.workdir:
            _run(["rm", "-rf", "--one-file-system", self.workdir], check=False)

    def _make_host_dirs(self, host: Host) -> None:
        if host is self.server:
            super()._make_host_dirs(host)
            return
        SystemdHosts._make_host_dirs(self, host)
        _run(["ip", "-n", host.netns, "link", "set", "eth0", "address", self.mac(host)])
        wants = host.path("/etc/systemd/system/multi-user.target.wants")
        os.makedirs(wants, exist_ok=True)
        # As `systemctl enable NetworkManager` links it (the D-Bus alias lets nmcli start it on demand).
        unit = "/lib/systemd/system/NetworkManager.service"
        os.symlink(unit, os.path.join(wants, "NetworkManager.service"))
        os.symlink(unit, host.path("/etc/systemd/system/dbus-org.freedesktop.NetworkManager.service"))
        # sshd may start before NetworkManager has the lease: listen on any address.
        with open(host.path("/etc/ssh/sshd_config.d/dllama-test.conf"), "w") as f:
            f.write("UseDNS no\nMaxSessions 50\nMaxStartups 50\n")
