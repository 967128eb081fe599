"""Command line: `dllama inference|chat|worker|convert|slice|random-model|cluster` and `dllama-api`.

Thin by design: each command is a module of `dllama.commands` with `add_arguments(parser)` and
`run(args) -> int`; those modules import nothing heavy (numpy, numba, the model, the network) until `run`,
so `dllama --help` and a flag mistake answer at once.
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
    "worker": ("dllama.commands.worker", "serve as a worker node for a root started with --workers"),
    "convert": ("dllama.commands.convert", "convert a GGUF model or a Hugging Face checkpoint to .m + .t files "
                                           "(a checkpoint also to GGUF)"),
    "slice": ("dllama.commands.slice", "cut a model into one weights file per worker, for `dllama worker --weights`"),
    "random-model": ("dllama.commands.random_model", "write a random-weight .m model of any shape (benchmarks)"),
    "cluster": ("dllama.commands.cluster", "start, stop and inspect a cluster described by an Ansible inventory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllama", description="Distributed Llama in Python.")
    parser.add_argument("--version", action="version", version=f"dllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _run_guarded(prog: str, fn, args) -> int:
    from dllama.commands.common import apply_spin, end_open_line

    try:
        apply_spin(args)
        return int(fn(args) or 0)
    except DllamaError as exc:
        end_open_line()
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


def build_api_parser() -> argparse.ArgumentParser:
    from dllama.commands import api

    parser = argparse.ArgumentParser(prog="dllama-api", description="OpenAI-compatible HTTP server.")
    api.add_arguments(parser)
    parser.set_defaults(_run=api.run)
    return parser


def main_api(argv: list[str] | None = None) -> int:
    args = build_api_parser().parse_args(argv)
    return _run_guarded("dllama-api", args._run, args)


if __name__ == "__main__":
    sys.exit(main())
