"""Two network namespaces joined by a veth pair shaped like a home gigabit switch, for bench/cluster.py.

Needs root (ip netns, tc). Each side's egress is shaped with `tc qdisc ... netem delay 0.1ms rate 1gbit`
(0.2 ms round trip, 1 Gbit/s each way). A kernel without netem (CONFIG_NET_SCH_NETEM unset, as in some
containers) gets `tbf rate 1gbit` only: the bandwidth is real, the delay is not, and `Link.delay_s` says
so (0), so that a caller can add round trips x RTT itself and say it did. Addresses are private ones that
exist only inside the two namespaces, which are deleted on exit (with their veth pair).
"""

from __future__ import annotations

import os
import subprocess

ROOT_ADDR, WORKER_ADDR = "10.213.0.1", "10.213.0.2"   # only ever inside the two namespaces below
DELAY_S, RATE_BITS = 100e-6, 1e9
VETH_NOTE = ", 66 B of headers a segment"


class Link:
    """`with Link() as link:` run commands on either side with link.root(cmd) / link.worker(cmd) prefixes."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns_root, self.ns_worker = f"dlx{tag}r", f"dlx{tag}w"
        self._veth = (f"dlx{tag}a", f"dlx{tag}b")
        self.qdisc = ""
        self.delay_s = 0.0

    def root(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns_root, *cmd]

    def worker(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns_worker, *cmd]

    def __enter__(self) -> "Link":
        if os.geteuid() != 0:
            raise SystemExit("--link shaped needs root (ip netns, tc)")
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _up(self) -> None:
        a, b = self._veth
        for ns in (self.ns_root, self.ns_worker):
            _ip("netns", "add", ns)
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        for ns, dev, addr in ((self.ns_root, a, ROOT_ADDR), (self.ns_worker, b, WORKER_ADDR)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        for ns, dev in ((self.ns_root, a), (self.ns_worker, b)):
            netem = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0.1ms", "rate", "1gbit"]
            if subprocess.run(netem, capture_output=True).returncode == 0:
                self.qdisc, self.delay_s = "netem delay 0.1ms rate 1gbit", DELAY_S
            else:
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit",
                                "burst", "32kb", "latency", "50ms"], check=True, capture_output=True)
                self.qdisc, self.delay_s = "tbf rate 1gbit (no netem in this kernel: no added delay)", 0.0

    def close(self) -> None:
        for ns in (self.ns_root, self.ns_worker):   # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
