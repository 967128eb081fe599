"""The first run ever says it is compiling; a run with the numba cache warm does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_first_run_says_it_compiles_and_the_second_does_not(smollm2_path, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    cmd = [sys.executable, "-m", "dllama", "inference", "--model", smollm2_path, "--prompt", "Hi",
           "--steps", "2", "--temperature", "0", "--max-seq-len", "64"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "compiling kernels" in first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr
    assert second.stdout.startswith("Hi")
