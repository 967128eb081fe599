"""bench/delayline.py, the link bench/cluster.py measures two nodes through where the kernel has no netem:
between two network namespaces made here (and removed), a round trip must take 0.2 ms longer than through
the same line without delay, a bulk transfer the time its rate allows, and every byte must arrive as sent."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import netns  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"),
                                reason="needs root, /dev/net/tun and ip (network namespaces)")

SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], 0)) as s:
    print(s.getsockname()[1], flush=True)
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := c.recv(1 << 16):
        c.sendall(data)
"""

CLIENT = """
import hashlib, json, os, socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def echo(data):
    c.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        got += c.recv(1 << 16)
    return bytes(got)
rtts = []
for _ in range(60):
    t = time.perf_counter()
    assert echo(b"x" * 64) == b"x" * 64
    rtts.append(time.perf_counter() - t)
bulk = os.urandom(2_000_000)
t = time.perf_counter()
back = echo(bulk)
print(json.dumps({"rtt_ms": 1e3 * statistics.median(rtts[10:]), "bulk_ms": 1e3 * (time.perf_counter() - t),
                  "intact": hashlib.sha256(back).digest() == hashlib.sha256(bulk).digest()}))
"""


def echo_through(link) -> dict:
    server = subprocess.Popen(link.worker([sys.executable, "-c", SERVER, netns.WORKER_ADDR]), stdout=subprocess.PIPE,
                              text=True)
    try:
        port = server.stdout.readline().strip()
        out = subprocess.run(link.root([sys.executable, "-c", CLIENT, netns.WORKER_ADDR, port]),
                             capture_output=True, text=True, timeout=60)
    finally:
        server.kill()
        server.wait(10)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["intact"]
    return got


def test_the_delay_line_adds_its_round_trip():
    # the line's own forwarding takes time too (a wake-up and two TUN copies a packet): the same line
    # without delay, run beside it, is the baseline
    with netns.Link(delay_line=True, tag="d") as link, netns.Link(delay_line=True, delay_s=0.0, tag="z") as bare:
        assert link.delay_s == netns.DELAY_S and "delay line" in link.qdisc and bare.delay_s == 0
        delayed = [echo_through(link)["rtt_ms"] for _ in range(2)]
        plain = [echo_through(bare)["rtt_ms"] for _ in range(2)]
    assert 0.15 <= min(delayed) - min(plain) < 2, (delayed, plain)
    assert "root to worker" in link.lateness() and "worker to root" in bare.lateness()
    assert all(way["packets"] > 0 for way in (*link._stats, *bare._stats))
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in (link.ns_root, link.ns_worker, bare.ns_root, bare.ns_worker):
        assert ns not in names
    for dev in (*link._veth, *bare._veth):
        assert subprocess.run(["ip", "link", "show", "dev", dev], capture_output=True).returncode != 0


def test_the_delay_line_paces_at_its_rate():
    # 100 Mbit/s, well under what the line can forward, so that the pacing and not the line sets the time:
    # 2 MB each way at once, 90 bytes of Ethernet and TCP/IP framing per 1448-byte segment
    with netns.Link(delay_line=True, rate_bits=100e6) as link:
        got = echo_through(link)
    assert 0.9 * 2e6 * 8 / 100e6 * (1448 + 90) / 1448 * 1e3 <= got["bulk_ms"] < 5000, got
