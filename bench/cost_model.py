"""The exchange's cost model: bytes and round trips per generated token, and the time they take on a link.

    python bench/cost_model.py [--overhead-us 15] [--rtt-ms 0.2] [--gbits 1]

One token is, on the star (docs/protocol.md): the root's STEP with x, to the N - 1 workers; then
2 * n_layers all-reduces of the partial sums; then each worker's last answer (its best token, its top
candidates or its logits, after its TIMES frame). With two nodes an all-reduce is a swap: both send their
partial at once and each adds the other's, one one-way trip. With three or more the workers send theirs
to the root, which sends the sum back: a round trip. On the critical path an exchange costs

    overhead(N) + its one-way trips * RTT / 2 + the root link's bytes / bandwidth

where the root's link carries, per all-reduce, one partial each way with two nodes (full duplex, at
once) and N - 1 partials in, then N - 1 sums out, with more; wire() adds TCP/IPv4/Ethernet framing per
1448-byte segment (90 bytes on a real Ethernet: headers, preamble, gap; 66 on a veth), and overhead(N)
is the Python and system-call time of an exchange, measured with processes computing nothing
(bench/cluster.py --exchanges-only): each further worker adds the root's share of it (half: the root
sends and receives once per worker, a worker once in all).
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
    """Exchanges, one-way trips on the critical path, and the bytes the root sends and receives per
    generated token. sampling: "greedy", "top-p" (top candidates decide) or "full" (f32 logits gathered)."""
    x = FRAME + (dim // 32 * 34 if buffer == "q80" else 4 * dim)
    reply = TIMES + FRAME + {"greedy": 16 + 8, "top-p": 16 + 8 * TOP_K, "full": 4 * vocab // n_nodes}[sampling]
    syncs = 2 * n_layers
    workers = n_nodes - 1
    return {"exchanges": syncs + 1, "trips": 2 + syncs * (1 if n_nodes == 2 else 2), "x_bytes": x,
            "reply_bytes": reply, "sent_bytes": workers * (STEP + (1 + syncs) * x),
            "recv_bytes": workers * (syncs * x + reply)}


def components(dim: int, n_layers: int, vocab: int, n_nodes: int, overhead_s: float, rtt_s: float,
               bits_per_s: float, per_segment: int = ETHERNET_OVERHEAD, buffer: str = "q80",
               sampling: str = "greedy") -> dict:
    """Seconds per token the exchanges add on the critical path, by cause: "overhead" (Python and system
    calls), "latency" (half an RTT per one-way trip) and "wire" (the root link's bytes at its speed)."""
    t = per_token(dim, n_layers, vocab, n_nodes, buffer, sampling)
    workers, syncs = n_nodes - 1, 2 * n_layers
    x, reply = _wire(t["x_bytes"], per_segment), _wire(t["reply_bytes"], per_segment)
    per_sync = x if n_nodes == 2 else 2 * workers * x
    wire_bytes = workers * (_wire(STEP, per_segment) + x + reply) + syncs * per_sync
    return {"overhead": t["exchanges"] * overhead_s * (1 + ROOT_SHARE * (workers - 1)),
            "latency": t["trips"] * rtt_s / 2, "wire": 8 * wire_bytes / bits_per_s}


def transfer_s(*args, **kw) -> float:
    """The sum of `components` (same arguments)."""
    return sum(components(*args, **kw).values())


def table(overhead_s: float, rtt_s: float, bits_per_s: float) -> str:
    lines = [f"per-exchange overhead {overhead_s * 1e6:.0f} us, RTT {rtt_s * 1e3:.2f} ms, "
             f"{bits_per_s / 1e9:g} Gbit/s, Q80 buffers, greedy (top-p: + the candidates, full: + the logits)",
             f"{'model':<16}{'nodes':>6}{'one-way trips':>14}{'root sends kB':>14}{'receives kB':>12}"
             f"{'ms/token':>10}{'top-p':>8}{'full f32':>10}"]
    for name, (dim, n_layers, vocab) in SHAPES.items():
        for n in (2, 4, 8):
            t = per_token(dim, n_layers, vocab, n)
            ms = [1e3 * transfer_s(dim, n_layers, vocab, n, overhead_s, rtt_s, bits_per_s, sampling=s)
                  for s in ("greedy", "top-p", "full")]
            lines.append(f"{name:<16}{n:>6}{t['trips']:>14}{t['sent_bytes'] / 1e3:>14.1f}"
                         f"{t['recv_bytes'] / 1e3:>12.1f}{ms[0]:>10.1f}{ms[1]:>8.1f}{ms[2]:>10.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overhead-us", type=float, default=15.0,
                    help="per-exchange overhead measured by bench/cluster.py --exchanges-only "
                         "(default 15: 2 cores, with the spin)")
    ap.add_argument("--rtt-ms", type=float, default=0.2, help="round-trip time of the link (default 0.2)")
    ap.add_argument("--gbits", type=float, default=1.0, help="link speed, Gbit/s (default 1)")
    args = ap.parse_args()
    print(table(args.overhead_us * 1e-6, args.rtt_ms * 1e-3, args.gbits * 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
