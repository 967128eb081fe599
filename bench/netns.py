"""Two network namespaces joined by a veth pair shaped like a home gigabit switch, for bench/cluster.py.

Needs root (ip netns, tc). Each side's egress is shaped with `tc qdisc ... netem delay 0.1ms rate 1gbit`
(0.2 ms round trip, 1 Gbit/s each way). A kernel without netem (CONFIG_NET_SCH_NETEM unset, as in some
containers) gets the same link from bench/delayline.py instead: two TUN devices, one in each namespace,
and a real-time process a direction between them that holds each packet for the delay and paces it at
the rate.
Without TUN either, `tbf rate 1gbit` only: the bandwidth is real, the delay is not, and `Link.delay_s` says
so (0), so that a caller can add round trips x RTT itself and say it did. Addresses are private ones that
exist only inside the two namespaces, which are deleted on exit (with their devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cost_model import ETHERNET_OVERHEAD, VETH_OVERHEAD

ROOT_ADDR, WORKER_ADDR = "10.213.0.1", "10.213.0.2"   # only ever inside the two namespaces below
DELAY_S, RATE_BITS = 100e-6, 1e9


class Link:
    """`with Link() as link:` run commands on either side with link.root(cmd) / link.worker(cmd) prefixes."""

    def __init__(self, delay_line: bool = False, delay_s: float = DELAY_S, rate_bits: float = RATE_BITS,
                 tag: str = "", cpus: tuple[int, int] | None = None):
        """delay_line: use bench/delayline.py even where the kernel has netem; delay_s: one way (a delay
        line without delay shows what the line itself costs); tag: tells apart the links of one process;
        cpus: the cores the root and the worker run on, where the delay line's two directions should run."""
        self._force_line, self._cpus = delay_line, cpus
        self._delay, self._rate = delay_s, rate_bits
        tag = f"{os.getpid() % 100000}{tag}"
        self.ns_root, self.ns_worker = f"dlx{tag}r", f"dlx{tag}w"
        self._veth = (f"dlx{tag}a", f"dlx{tag}b")
        self.qdisc = ""
        self.delay_s = 0.0
        self.per_segment = VETH_OVERHEAD   # framing bytes per TCP segment (an Ethernet's through the delay line)
        self._line = None       # the delay line's process, when it is the link
        self._stats = None      # its figures' file, then (once it has stopped) the figures
        self.is_delay_line = False

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
        self._address(a, b)
        for ns, dev in ((self.ns_root, a), (self.ns_worker, b)):
            delay = f"{self._delay * 1e6:g}us"
            rate = f"{self._rate / 1e6:g}mbit"
            netem = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", delay, "rate", rate]
            if not self._force_line and subprocess.run(netem, capture_output=True).returncode == 0:
                self.qdisc, self.delay_s = f"netem delay {delay} rate {rate}", self._delay
            elif os.path.exists("/dev/net/tun"):
                _ip("-n", self.ns_root, "link", "del", a)   # and its peer
                self._delay_line(a, b)
                return
            else:
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                                "burst", "32kb", "latency", "50ms"], check=True, capture_output=True)
                self.qdisc, self.delay_s = f"tbf rate {rate} (no netem in this kernel: no added delay)", 0.0

    def _address(self, a: str, b: str) -> None:
        for ns, dev, addr, peer in ((self.ns_root, a, ROOT_ADDR, WORKER_ADDR), (self.ns_worker, b, WORKER_ADDR,
                                                                                 ROOT_ADDR)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", addr, "peer", f"{peer}/32", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _delay_line(self, a: str, b: str) -> None:
        fd, self._stats = tempfile.mkstemp(prefix="delayline-", suffix=".json")
        os.close(fd)
        cpus = ["--cpus", *map(str, self._cpus)] if self._cpus else []
        self._line = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delayline.py")), a, b,
                                       "--delay-us", str(self._delay * 1e6), "--rate-bits", str(self._rate),
                                       "--stats", self._stats, *cpus], stdout=subprocess.PIPE, text=True)
        if self._line.stdout.readline().strip() != "ready":
            raise RuntimeError("bench/delayline.py did not start")
        self._address(a, b)
        self.qdisc = (f"delay line {self._delay * 1e3:g} ms + {self._rate / 1e9:g} Gbit/s each way over TUN "
                      f"(bench/delayline.py"
                      f"{'' if self._force_line else '; no netem in this kernel'})")
        self.delay_s, self.per_segment = self._delay, ETHERNET_OVERHEAD
        self.is_delay_line = True

    def lateness(self) -> str:
        """How far from their time the delay line let packets through, once closed ("" for a qdisc)."""
        if not isinstance(self._stats, list):
            return ""
        ways = [f"{way} {s['packets']} packets left {s['error_us_median']:+.0f} us from their time (median; 10th "
                f"percentile {s['error_us_p10']:+.0f}, 90th {s['error_us_p90']:+.0f}, latest {s['error_us_max']:+.0f})"
                for way, s in zip(("root to worker", "worker to root"), self._stats)]
        cpu_us = 1e6 * sum(s["cpu_s"] for s in self._stats) / max(1, sum(s["packets"] for s in self._stats))
        return f"delay line: {'; '.join(ways)}; its own CPU {cpu_us:.0f} us a packet"

    def close(self) -> None:
        if self._line is not None:
            self._line.terminate()
            self._line.wait(10)
            self._line = None
        if isinstance(self._stats, str):
            base = Path(self._stats)
            ways = [base.with_name(f"{base.name}.{way}") for way in (0, 1)]
            ready = all(f.exists() and f.stat().st_size for f in ways)
            self._stats = [json.loads(f.read_text()) for f in ways] if ready else None
            for f in (base, *ways):
                f.unlink(missing_ok=True)
        for ns in (self.ns_root, self.ns_worker):   # deleting a namespace deletes its devices
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
