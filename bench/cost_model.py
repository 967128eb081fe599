"""The exchange's cost model: bytes and round trips per generated token, and the time they take on a link.

    python bench/cost_model.py [--overhead-us 40] [--rtt-ms 0.2] [--gbits 1]

One token is 2 * n_layers + 1 round trips on the star (docs/protocol.md): the root broadcasts x to the
N - 1 workers, each answers its partial sum (the last round: its best token, its top candidates or its
logits, after its TIMES frame). A round trip costs, on the critical path,

    overhead(N) + RTT + (N - 1) * wire(x) / bandwidth     (the root's link sends N - 1 copies of x)
                      + (N - 1) * wire(reply) / bandwidth  (and takes N - 1 replies, queued at the switch)

where wire() adds TCP/IPv4/Ethernet framing per 1448-byte segment (90 bytes on a real Ethernet: headers,
preamble, gap; 66 on a veth) and overhead(N) is the Python and system-call time of an exchange, measured
with 2 processes computing nothing (bench/cluster.py --exchanges-only): each further worker adds the
root's share of it (half: the root sends and receives once per worker, a worker once in all).
"""

from __future__ import annotations

import argparse
import math

SHAPES = {  # (dim, n_layers, vocab)
    "Llama 3 8B": (4096, 32, 128256),
    "1B shape (b1)": (2048, 16, 49152),
}
MSS = 1448
ETHERNET_OVERHEAD, VETH_OVERHEAD = 90, 66   # bytes per TCP segment on the wire
FRAME = 18                                  # BUFFER header + meta
STEP = 8 + 19 + 4 + 4                       # STEP header + meta + one position and its slot
TIMES = 8 + 16                              # the worker's timings ahead of its last answer of a pass
TOP_K = 64
ROOT_SHARE = 0.5


def _wire(nbytes: float, per_segment: int) -> float:
    return nbytes + math.ceil(nbytes / MSS) * per_segment


def per_token(dim: int, n_layers: int, vocab: int, n_nodes: int, buffer: str = "q80",
              sampling: str = "greedy") -> dict:
    """Round trips and the bytes the root sends and receives per generated token. sampling: "greedy",
    "top-p" (top candidates decide) or "full" (f32 logits gathered)."""
    x = FRAME + (dim // 32 * 34 if buffer == "q80" else 4 * dim)
    reply = TIMES + FRAME + {"greedy": 16 + 8, "top-p": 16 + 8 * TOP_K, "full": 4 * vocab // n_nodes}[sampling]
    rounds = 2 * n_layers + 1
    workers = n_nodes - 1
    return {"round_trips": rounds, "x_bytes": x, "reply_bytes": reply,
            "sent_bytes": workers * (STEP + rounds * x), "recv_bytes": workers * ((rounds - 1) * x + reply)}


def components(dim: int, n_layers: int, vocab: int, n_nodes: int, overhead_s: float, rtt_s: float,
               bits_per_s: float, per_segment: int = ETHERNET_OVERHEAD, buffer: str = "q80",
               sampling: str = "greedy") -> dict:
    """Seconds per token the exchanges add on the critical path, by cause: "overhead" (Python and system
    calls), "latency" (one RTT per round trip) and "wire" (the root's bytes at the link's speed)."""
    t = per_token(dim, n_layers, vocab, n_nodes, buffer, sampling)
    workers, rounds = n_nodes - 1, t["round_trips"]
    x, reply = _wire(t["x_bytes"], per_segment), _wire(t["reply_bytes"], per_segment)
    wire_bytes = workers * (_wire(STEP, per_segment) + rounds * x + (rounds - 1) * x + reply)
    return {"overhead": rounds * overhead_s * (1 + ROOT_SHARE * (workers - 1)), "latency": rounds * rtt_s,
            "wire": 8 * wire_bytes / bits_per_s}


def transfer_s(*args, **kw) -> float:
    """The sum of `components` (same arguments)."""
    return sum(components(*args, **kw).values())


def table(overhead_s: float, rtt_s: float, bits_per_s: float) -> str:
    lines = [f"per-exchange overhead {overhead_s * 1e6:.0f} us, RTT {rtt_s * 1e3:.2f} ms, "
             f"{bits_per_s / 1e9:g} Gbit/s, Q80 buffers, greedy (top-p: + the candidates, full: + the logits)",
             f"{'model':<16}{'nodes':>6}{'round trips':>12}{'root sends kB':>14}{'receives kB':>12}"
             f"{'ms/token':>10}{'top-p':>8}{'full f32':>10}"]
    for name, (dim, n_layers, vocab) in SHAPES.items():
        for n in (2, 4, 8):
            t = per_token(dim, n_layers, vocab, n)
            ms = [1e3 * transfer_s(dim, n_layers, vocab, n, overhead_s, rtt_s, bits_per_s, sampling=s)
                  for s in ("greedy", "top-p", "full")]
            lines.append(f"{name:<16}{n:>6}{t['round_trips']:>12}{t['sent_bytes'] / 1e3:>14.1f}"
                         f"{t['recv_bytes'] / 1e3:>12.1f}{ms[0]:>10.1f}{ms[1]:>8.1f}{ms[2]:>10.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overhead-us", type=float, default=40.0,
                    help="per-exchange overhead measured by bench/cluster.py --exchanges-only (default 40)")
    ap.add_argument("--rtt-ms", type=float, default=0.2, help="round-trip time of the link (default 0.2)")
    ap.add_argument("--gbits", type=float, default=1.0, help="link speed, Gbit/s (default 1)")
    args = ap.parse_args()
    print(table(args.overhead_us * 1e-6, args.rtt_ms * 1e-3, args.gbits * 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
