"""`dllama slice`: cut a model into one file per worker node, for workers started with `--weights FILE`
(they then load their slice from their own disk instead of receiving it from the root at every start)."""

from __future__ import annotations

import os
import sys

from dllama.commands.common import check_at_least
from dllama.errors import DllamaError


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="model file (.m or GGUF), or an installed catalogue model, as the root will load it")
    parser.add_argument("--nodes", type=int, required=True,
                        help="nodes of the cluster, the root included (the root's --workers count + 1)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory to write node<I>-of-<N>.dlslice into (created if missing)")
    parser.add_argument("--split", default=None, metavar="W0,W1,...",
                        help="each node's share, root first, as the root's --split will give it (default: even); "
                             "'auto' is measured at every start, so a slice cannot be cut for it")
    parser.add_argument("--node", type=int, action="append", default=None, metavar="I",
                        help="write only worker node I (repeatable; default every worker, 1..N-1)")


def run(args) -> int:
    check_at_least("--nodes", args.nodes, 2)
    nodes = sorted(set(args.node or range(1, args.nodes)))
    bad = [i for i in nodes if not 0 < i < args.nodes]
    if bad:
        raise DllamaError(f"--node {bad[0]}: worker nodes of a {args.nodes}-node cluster are 1..{args.nodes - 1}")
    from dllama.catalog import resolve_model
    from dllama.formats.convert import sigterm_as_exit
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition
    from dllama.model.split import AUTO, parse_split
    from dllama.net.slicefile import model_fingerprint, slice_name, write_slice

    weights = parse_split(args.split, args.nodes)
    if weights == AUTO:
        raise DllamaError("--split auto: the shares are measured at every start; cut slices for fixed weights")
    loaded = load_model(resolve_model(args.model))
    plan = partition(loaded.spec, args.nodes, weights)   # refuses a node count the model cannot be split over
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise DllamaError(f"--out {args.out}: cannot create it ({exc.strerror or exc})") from None
    model_id = model_fingerprint(loaded.path)
    with sigterm_as_exit():
        for i in nodes:
            path = os.path.join(args.out, slice_name(i, args.nodes))
            size = write_slice(path, loaded, plan, i, model_id)
            print(f"wrote {path}: node {i} of {args.nodes}, {size / 1e6:.1f} MB of weights", file=sys.stdout)
    return 0
