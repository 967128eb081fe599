"""What the commands share: the flags of every command that runs a model (inference, chat, dllama-api), as
the reference names them; checks of flag values; opening the engine; streaming text to stdout."""

from __future__ import annotations

import argparse
import os
import sys

from dllama.errors import DllamaError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="model file (Distributed Llama .m or GGUF), or the name of an installed catalogue model "
                        "such as smollm2_135m_instruct")
    g.add_argument("--tokenizer", help="tokenizer file (.t); optional for GGUF models, which carry theirs")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="limit the context (KV cache) to this many tokens (default: the model's)")
    g.add_argument("--nthreads", type=int, default=1, help="compute threads on this node (default 1)")
    g.add_argument("--buffer-float-type", choices=("f32", "q80"), default="q80",
                   help="float type of the activations exchanged between nodes (default q80)")
    g.add_argument("--workers", nargs="*", default=[], metavar="HOST:PORT",
                   help="worker nodes, in order (the root is node 0); any number up to the model's query heads")
    g.add_argument("--split", default=None, metavar="auto|W0,W1,...",
                   help="each node's share of the model: one weight per node (root first), such as 3,1,1, or "
                        "'auto': by each node's measured speed, within its free memory (default: even)")
    add_m_keys_argument(g)
    add_key_argument(g)
    add_spin_argument(g)
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    s.add_argument("--topp", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    s.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def add_m_keys_argument(parser) -> None:
    parser.add_argument("--m-keys", choices=("auto", "2024", "2025"), default="auto",
                        help="which reference key set a .m file was written with: 2024 (arch ids of Grok-1 and "
                             "Mixtral) or 2025 (the same ids for Qwen3 and Qwen3-MoE); auto (default) tells them "
                             "apart by the header keys")


def add_key_argument(parser) -> None:
    parser.add_argument("--cluster-key-file", metavar="PATH", default=None,
                        help="file holding the cluster's shared secret (default: env DLLAMA_CLUSTER_KEY_FILE); "
                             "roots and workers must hold the same one")


def add_spin_argument(parser) -> None:
    parser.add_argument("--spin-us", metavar="US", default=None,
                        help="microseconds a node waiting for another node's answer keeps asking before it "
                             "sleeps (default: env DLLAMA_SPIN_US, else 0). About 2000 saves a wake-up per "
                             "exchange where every node has a core to itself; where nodes share cores, a spin "
                             "takes the core from the node that would answer: leave it 0")


def apply_spin(args) -> None:
    """--spin-us, for the commands that take it, for every exchange this process makes; DllamaError for a
    malformed value. Called for every command before it runs (dllama.cli)."""
    if getattr(args, "spin_us", None) is None:
        return
    from dllama.net.transport import set_spin

    set_spin(args.spin_us)


def check_port(flag: str, port: int, *, listen: bool = False) -> int:
    """`port` if it is one a socket can use (0, "any free port", only for listening); else DllamaError."""
    low = 0 if listen else 1
    if not low <= port <= 65535:
        raise DllamaError(f"{flag}: port {port} is not in {low}..65535")
    return port


def check_at_least(flag: str, value, low) -> None:
    """DllamaError naming `flag` unless value >= low (None: the flag was not given)."""
    if value is not None and value < low:
        raise DllamaError(f"{flag} must be at least {low}, got {value}")


def parse_workers(items: list[str]) -> list[tuple[str, int]]:
    out = []
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DllamaError(f"--workers: {item!r} is not HOST:PORT")
        out.append((host, check_port(f"--workers {item}", int(port))))
    return out


def open_engine(args, log=None, on_lost=None):
    from dllama.engine import Engine
    from dllama.model.split import parse_split
    from dllama.net.auth import key_from_args
    from dllama.progress import Board

    if not kernels_cached():
        print("compiling kernels (first run only; later runs start in seconds)...", file=sys.stderr, flush=True)
    from dllama.catalog import resolve_model

    split = parse_split(getattr(args, "split", None), 1 + len(args.workers))
    if split is not None and log is None:   # the plan is printed, with the workers it was made for
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    return Engine.open(resolve_model(args.model), args.tokenizer, nthreads=args.nthreads, max_seq_len=args.max_seq_len,
                       buffer_float_type=args.buffer_float_type, workers=parse_workers(args.workers), log=log,
                       cluster_key=key_from_args(args) if args.workers else None, on_lost=on_lost,
                       parallel=getattr(args, "parallel", 1), split=split, m_keys=getattr(args, "m_keys", "auto"),
                       progress=Board().add)


def kernels_cached() -> bool:
    """Whether numba has compiled our kernels before (its cache index files exist)."""
    from pathlib import Path

    import dllama

    kernels = Path(dllama.__file__).parent / "kernels"
    root = os.environ.get("NUMBA_CACHE_DIR")
    places = [Path(root)] if root else [kernels / "__pycache__"]
    return any(next(p.rglob("*matmul*.nbi"), None) for p in places if p.is_dir())


def make_sampler(args):
    from dllama.sampler import Sampler

    return Sampler(args.temperature, args.topp, args.seed)


_line_open = False   # streamed text on stdout has not ended its line


def write_out(text: str) -> None:
    """Stream `text` to stdout now, remembering whether it left a line open (see `end_open_line`)."""
    global _line_open
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
        _line_open = not text.endswith("\n")


def end_open_line() -> None:
    """End a line that streamed text left open, so that an error printed next (on stderr, usually the same
    terminal) starts on a line of its own rather than after the last generated word."""
    global _line_open
    if _line_open:
        _line_open = False
        sys.stdout.write("\n")
        sys.stdout.flush()


def isatty(stream) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return False
