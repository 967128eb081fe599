"""`dllama-api --split auto` as a real process on loopback: when a lost worker returns, the healing path
measures every node again before it streams the slices, and says whether it kept the plan."""

from __future__ import annotations

import os
import signal
import time

import pytest
from cluster_fixtures import KEY_ARGS, WorkerProcess
from test_api_cluster import split_model  # noqa: F401  (fixture)
from test_api_heal import COMMON, _chat, _pid
from test_api_openai import httpx, running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_healing_under_split_auto_measures_again(split_model, smollm2_path, tmp_path):
    w = WorkerProcess(tmp_path).wait_ready()
    try:
        with running_server(split_model, "--tokenizer", smollm2_path, *COMMON, "--workers", w.address,
                            "--split", "auto", *KEY_ARGS) as base:
            log = os.readlink(f"/proc/{_pid(base)}/fd/1")   # the server's output file

            def said() -> str:
                with open(log) as f:
                    return f.read()

            assert said().count("split by measured speed:") == 1
            assert _chat(base).status_code == 200
            w.proc.send_signal(signal.SIGKILL)
            w.stop()
            w = WorkerProcess(tmp_path, port=w.port).wait_ready()
            returned = time.monotonic()
            while (r := _chat(base)).status_code != 200 and time.monotonic() - returned < 30:
                time.sleep(0.2)
            assert r.status_code == 200, r.text
            assert httpx.get(f"{base}/health").json()["status"] == "ready"
            text = said()
            measured = [line for line in text.splitlines() if "re-measured: " in line]
            assert len(measured) == 1, text[-3000:]
            # kept within the tolerance, or a new plan printed with its shares
            assert ("keeping the plan in force" in measured[0]
                    or text.count("split by measured speed:") == 2), text[-3000:]
    finally:
        w.stop()
