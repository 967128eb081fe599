"""The command line answers `--help` and flag mistakes without importing the engine (numba, numpy, the
model, the network), and every command's flags are parsed in `dllama.commands`."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("numba", "numpy", "dllama.net.worker", "dllama.kernels", "dllama.model", "dllama.engine", "gguf")


def imported_by(*argv: str, module: str = "dllama") -> set[str]:
    """Top-level-or-dotted module names that `python -X importtime -m module argv` imported."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    names = set()
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert names, res.stderr[-2000:]   # -X importtime reports something, or the check below means nothing
    return names


@pytest.mark.parametrize("argv", [("--help",), ("worker", "--help"), ("convert", "--help"),
                                  ("random-model", "--help"), ("cluster", "up", "--help"),
                                  ("inference", "--help"), ("chat", "--help")])
def test_help_imports_nothing_heavy(argv):
    names = imported_by(*argv)
    assert "dllama.cli" in names
    assert not {n for n in names if n.startswith(HEAVY)}


def test_a_bad_flag_value_is_answered_before_the_engine_is_imported():
    names = imported_by("worker", "--port", "70000")
    assert not {n for n in names if n.startswith(HEAVY)}


def test_api_help_imports_nothing_heavy():
    res = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import sys; from dllama.cli import main_api; sys.exit(main_api())", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names = {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "dllama.commands.api" in names
    assert not {n for n in names if n.startswith(HEAVY + ("fastapi", "uvicorn", "dllama.api"))}


def test_every_command_parses_its_flags_in_commands():
    from dllama.cli import COMMANDS

    assert all(module.startswith("dllama.commands.") for module, _help in COMMANDS.values())


def test_an_error_after_streamed_text_starts_on_its_own_line(capfd):
    from dllama.cli import _run_guarded
    from dllama.commands.common import write_out
    from dllama.net.transport import ConnectionLost

    def generate(args):
        write_out("The capital of France is")
        write_out(" Paris")
        raise ConnectionLost("worker 127.0.0.1:9998: closed the connection")

    assert _run_guarded("dllama", generate, None) == 2
    out, err = capfd.readouterr()
    assert out == "The capital of France is Paris\n"
    assert err == "dllama: error: worker 127.0.0.1:9998: closed the connection\n"


def test_an_error_after_a_finished_line_adds_no_blank_line(capfd):
    from dllama.cli import _run_guarded
    from dllama.commands.common import write_out
    from dllama.errors import DllamaError

    def generate(args):
        write_out("a whole line\n")
        raise DllamaError("late")

    assert _run_guarded("dllama", generate, None) == 2
    assert capfd.readouterr() == ("a whole line\n", "dllama: error: late\n")
