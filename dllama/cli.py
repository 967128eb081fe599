"""Command line: `dllama inference|chat|worker|convert|random-model|cluster` and `dllama-api`.

Thin by design: each subcommand is an `add_arguments(parser)` / `run(args) -> int` pair living in the
module that does the work; heavy imports (numba, the model) happen only inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dllama import __version__
from dllama.errors import DllamaError

# name -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "inference": ("dllama.commands.inference", "generate text from a prompt and print timing figures (a benchmark)"),
    "chat": ("dllama.commands.chat", "chat with a model in the terminal"),
    "worker": ("dllama.net.worker", "serve as a worker node for a root started with --workers"),
    "convert": ("dllama.formats.convert", "convert a GGUF model to Distributed Llama .m + .t files"),
    "random-model": ("dllama.formats.random_model", "write a random-weight .m model of any shape (benchmarks)"),
    "cluster": ("dllama.cluster.cli", "start, stop and inspect a cluster described by an Ansible inventory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllama", description="Distributed Llama in Python.")
    parser.add_argument("--version", action="version", version=f"dllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not module_name.startswith(exc.name):
                raise
            continue  # a subcommand whose module is not part of this build
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _run_guarded(prog: str, fn, args) -> int:
    try:
        return int(fn(args) or 0)
    except DllamaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`dllama inference | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run_guarded("dllama", args._run, args)


def main_api(argv: list[str] | None = None) -> int:
    from dllama.api import server

    parser = argparse.ArgumentParser(prog="dllama-api", description="OpenAI-compatible HTTP server.")
    server.add_arguments(parser)
    args = parser.parse_args(argv)
    return _run_guarded("dllama-api", server.run, args)


if __name__ == "__main__":
    sys.exit(main())
