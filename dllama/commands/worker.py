"""`dllama worker`: serve as a worker node for a root started with --workers (dllama.net.worker does the work)."""

from __future__ import annotations

from dllama.commands.common import add_key_argument, add_spin_argument, check_at_least, check_port


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=9998, help="TCP port to listen on (default 9998; 0: any free port)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default 0.0.0.0: all; needs a cluster key, else loopback only)")
    parser.add_argument("--nthreads", type=int, default=1, help="compute threads (default 1)")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="this worker's slice file (from `dllama slice`): a root of the same model file and "
                             "plan lets the worker load it from here instead of streaming it the weights")
    add_key_argument(parser)
    add_spin_argument(parser)
    parser.add_argument("--insecure", action="store_true",
                        help="without a cluster key, listen on a non-loopback address anyway: anyone who can "
                             "reach the port can then use this worker")


def run(args) -> int:
    check_port("--port", args.port, listen=True)
    check_at_least("--nthreads", args.nthreads, 1)
    from dllama.net.worker import serve

    return serve(args)
