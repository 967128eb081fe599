"""`dllama cluster up|down|status|logs -i INVENTORY`: run the cluster an Ansible inventory describes
(dllama.cluster does the work).

    dllama cluster up -i inventory/home.yml --run inference --prompt "Hello" --steps 32
    dllama cluster status -i inventory/home.yml
    dllama cluster logs -i inventory/home.yml --follow
    dllama cluster down -i inventory/home.yml
"""

from __future__ import annotations

import argparse


# The root's flags most runs need, so that `up ... --prompt "Hello" --steps 32` works without `--`.
PASSED_THROUGH = {"--prompt": str, "--steps": int, "--temperature": float, "--topp": float, "--seed": int}


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    helps = {
        "up": "start the workers (in parallel), wait for their handshakes, then the root",
        "down": "stop the root's API and every worker (idempotent)",
        "status": "one row per node; exit status 1 if a node is unhealthy",
        "logs": "the last lines of every node's log, prefixed with its name",
    }
    for action, text in helps.items():
        p = sub.add_parser(action, help=text, description=text)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("-i", "--inventory", help="Ansible inventory (YAML or INI), as for playbooks/deploy.yml")
        src.add_argument("--hosts", nargs="+", metavar="[USER@]HOST[:PORT]",
                         help="ad hoc, without an inventory: the root first, then the workers")
        p.add_argument("--connect-timeout", type=float, default=10.0, help="SSH connect timeout, s (default 10)")
        if action == "up":
            p.add_argument("--run", choices=("none", "inference", "chat", "api"), default="none",
                           help="what the root runs once the workers are ready (default none: workers only)")
            p.add_argument("--model", help="model file on the root (default: dllama_root_model of the inventory)")
            p.add_argument("--timeout", type=float, default=120.0,
                           help="seconds to wait for every worker's handshake (default 120)")
            g = p.add_argument_group("passed to the root (anything else: after --)")
            for flag, kind in PASSED_THROUGH.items():
                g.add_argument(flag, type=kind, default=None, help=f"the root's {flag}")
            g.add_argument("--json", action="store_true", help="the root's --json (inference)")
            p.add_argument("root_args", nargs=argparse.REMAINDER,
                           help="after --: more arguments for the root, as they are")
        if action == "logs":
            p.add_argument("-n", "--lines", type=int, default=50, help="lines per node (default 50)")
            p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")


def _cluster(args):
    from dllama.cluster.inventory import from_hosts, read_inventory

    c = read_inventory(args.inventory) if args.inventory else from_hosts(args.hosts)
    if getattr(args, "model", None):
        c.model = args.model
    return c


def run(args) -> int:
    from dllama.cluster import ops, report

    c = _cluster(args)
    if args.action == "up":
        extra = []
        for flag in PASSED_THROUGH:
            value = getattr(args, flag[2:])
            if value is not None:
                extra += [flag, str(value)]
        extra += ["--json"] if args.json else []
        extra += [a for a in args.root_args if a != "--"] if args.root_args else []
        return ops.up(c, args.run, extra, args.timeout, args.connect_timeout)
    if args.action == "down":
        return ops.down(c, args.connect_timeout)
    if args.action == "status":
        return report.status(c, args.connect_timeout)
    return report.logs(c, args.lines, args.follow, args.connect_timeout)
