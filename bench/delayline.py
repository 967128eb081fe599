"""A link with a real one-way delay and line rate for kernels without netem: two TUN devices joined by two
processes, one a direction, which hold every packet in flight for the delay and pace it at the rate.

    python bench/delayline.py TUN_A TUN_B [--delay-us 100] [--rate-bits 1e9] [--stats FILE] [--cpus A B]

It creates the two devices (layer 3, no packet info), prints "ready", and forwards until SIGTERM; the
caller moves the devices into network namespaces and addresses them (bench/netns.py). Each direction is
a wire as netem models one: a packet starts to serialize when the direction is free, takes its size
(plus Ethernet's 38 bytes of header, check sum, preamble and gap) at the rate, then arrives `delay`
later. Each direction is a process of its own, SCHED_FIFO with 1 ns timer slack: it stands in for
hardware, so it must not wait behind the benchmark for a core. How far from its time each packet left
(10th, 50th and 90th percentile and the latest, over the packets forwarded) and the process's CPU go to
--stats at exit, so a caller can say what the link was.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
PR_SET_PDEATHSIG, PR_SET_TIMERSLACK = 1, 29
ETHERNET_FRAMING = 38   # 14 header + 4 check sum + 8 preamble + 12 inter-frame gap


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def forward(src: int, dst: int, delay: float, rate_bits: float, error: list[float]) -> None:
    """Forever: packets read from src leave through dst at their arrival time on the wire.

    A sleeping process wakes some tens of microseconds after its timer here (a guest's timer is
    virtualised), which would stretch every trip by as much: so it sleeps until `lead` before a packet is
    due, lead tracking the wake-ups' overshoot, and the packets leave as often early as late. `error` gets
    each packet's departure minus its arrival time on the wire."""
    queue = collections.deque()   # (arrival time on the far side, packet), in order
    free_at = 0.0                 # when the wire is next idle
    lead = 0.0
    clock, read, write, wait = time.perf_counter, os.read, os.write, select.select
    while True:
        now = clock()
        while queue and queue[0][0] <= now + lead:
            t, packet = queue.popleft()
            try:
                write(dst, packet)
            except OSError:   # the far device is not up (yet): dropped, as by a switch port that is down
                continue
            error.append(clock() - t)
        due = queue[0][0] if queue else None
        if not wait((src,), (), (), None if due is None else max(0.0, due - lead - clock()))[0]:
            lead = min(max(0.0, lead + 0.05 * (clock() - (due - lead) - lead)), delay / 2)
            continue
        now = clock()
        while True:
            try:
                packet = read(src, 65536)
            except BlockingIOError:
                break
            free_at = max(now, free_at) + (len(packet) + ETHERNET_FRAMING) * 8 / rate_bits
            queue.append((free_at + delay, packet))


def summary(error: list[float]) -> dict:
    s = sorted(error) or [0.0]
    cpu = os.times()
    return {"packets": len(error), "cpu_s": cpu.user + cpu.system,
            **{f"error_us_{name}": 1e6 * s[int(q * (len(s) - 1))]
               for name, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9), ("max", 1.0))}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tun", nargs=2, help="the two devices' names")
    ap.add_argument("--delay-us", type=float, default=100.0, help="one-way delay (default 100: a 0.2 ms RTT)")
    ap.add_argument("--rate-bits", type=float, default=1e9, help="line rate each way, bits/s (default 1e9)")
    ap.add_argument("--stats", default=None, help="at exit, how far from their time packets left, to FILE.0 (A to "
                                                  "B) and FILE.1 (B to A), JSON")
    ap.add_argument("--cpus", type=int, nargs=2, default=None, metavar=("CPU_A", "CPU_B"),
                    help="run the direction from A on CPU_A, the one from B on CPU_B")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    except PermissionError:
        print("delayline: not allowed SCHED_FIFO (needs root)", file=sys.stderr)
        return 1
    fds = [open_tun(name) for name in args.tun]
    error: list[float] = []
    # one process a direction, so that each can run on the core of the node that sends into it (--cpus),
    # where that node has just sent and waits, rather than take a core that computes
    child = os.fork()
    direction = 1 if child == 0 else 0   # 0: A to B, 1: B to A
    if child == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)   # never outlive the parent
    if args.cpus:
        os.sched_setaffinity(0, {args.cpus[direction]})

    def stop(*_):
        if child:
            os.kill(child, signal.SIGTERM)
            os.waitpid(child, 0)
        if args.stats:
            with open(f"{args.stats}.{direction}", "w") as f:
                json.dump(summary(error), f)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if child:
        print("ready", flush=True)
    forward(fds[direction], fds[1 - direction], args.delay_us * 1e-6, args.rate_bits, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
