"""Property-based fuzzing of `dllama-api` from its own OpenAPI spec (schemathesis): no request it can make,
valid or not, may get a 5xx or an answer the spec does not document. The server runs SmolLM2 with a small context and replies capped at one token,
so the run stays bounded (well under a minute on an idle machine)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from test_api_openai import running_server
from testlib import need

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_schemathesis_finds_no_server_error(smollm2_path, tmp_path):
    need(importlib.util.find_spec("schemathesis") is not None,
         "schemathesis is not installed (pip install 'dllama[test]')")
    # --max-tokens 1: every accepted request costs one token, so the run's length is the number of cases
    with running_server(smollm2_path, "--nthreads", "1", "--max-seq-len", "64", "--max-tokens", "1") as base:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
               # every check but one: no 5xx, and status codes, content types and bodies as the spec documents
               # them. Left out: "valid by the schema must be accepted", which a prompt over the context or an
               # empty prompt rightly is not.
               "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--max-examples", "10", "--workers", "1", "--seed", "7", "--phases", "coverage,fuzzing,stateful",
               "--generation-database", "none", "--request-timeout", "60", "--no-color"]
        # cwd: schemathesis and hypothesis leave their working files where they run
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "generated" in out.stdout and "passed" in out.stdout
