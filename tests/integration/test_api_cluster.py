"""`dllama-api --workers`: the server runs its model split over a worker on loopback.

The model is random (SmolLM2's shape with its heads padded to 12 / 4 KV heads so that it splits over two
nodes, 4 layers) with SmolLM2's tokenizer. The server's greedy reply must be the one `dllama inference`
gives on the same cluster, /health must show the cluster and the bytes it exchanged, and /v1/cluster
each node's share.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time

import pytest
from test_api_openai import httpx, running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]

PROMPT = "Once upon a time"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}


@contextlib.contextmanager
def worker():
    proc = subprocess.Popen([sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            if m:
                break
            if time.monotonic() > deadline:
                pytest.fail("the worker did not start listening")
        else:
            pytest.fail(f"the worker exited with {proc.wait()}")
        # keep reading its log, so that a full pipe never blocks it
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "padded.m"
    out = subprocess.run([sys.executable, "-m", "dllama", "random-model", "--output", str(path), "--preset",
                          "smollm2_135m", "--n-heads", "12", "--n-kv-heads", "4", "--n-layers", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return str(path)


def test_the_server_serves_a_cluster_as_the_cli_runs_it(split_model, smollm2_path):
    common = ["--tokenizer", smollm2_path, "--nthreads", "1", "--max-seq-len", "128", "--buffer-float-type", "f32"]
    with worker() as address:
        cli = subprocess.run([sys.executable, "-m", "dllama", "inference", "--model", split_model, *common,
                              "--workers", address, "--prompt", PROMPT, "--steps", "8", "--temperature", "0",
                              "--json"], capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-2000:]
        expected = json.loads(cli.stdout.strip().splitlines()[-1])
        # the worker frees its slice when a root leaves and serves the next one
        with running_server(split_model, *common, "--workers", address) as base:
            health = httpx.get(f"{base}/health").json()
            assert [n["state"] for n in health["nodes"]] == ["up", "up"] and health["workers"] == [address]
            r = httpx.post(f"{base}/v1/completions", timeout=120,
                           json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
            last = httpx.get(f"{base}/health").json()["last"]
            cluster = httpx.get(f"{base}/v1/cluster").json()
            scraped = httpx.get(f"{base}/metrics").text
            # constrained decoding over the cluster (the nodes' full logits): a random model writes this JSON
            constrained = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}})
    assert constrained.status_code == 200, constrained.text
    reply = json.loads(constrained.json()["choices"][0]["message"]["content"])
    assert set(reply) == {"ok", "n"} and isinstance(reply["ok"], bool) and reply["n"] in (1, 2, 3), reply
    assert r["usage"].pop("timings")["time_to_first_token_s"] > 0
    assert r["usage"] == {"prompt_tokens": len(expected["prompt_ids"]), "completion_tokens": 8, "total_tokens":
                          len(expected["prompt_ids"]) + 8}
    assert r["choices"][0]["text"] == expected["text"]
    assert last["sent_bytes_per_token"] > 0 and last["recv_bytes_per_token"] > 0
    # what the chat page's cluster panel shows: 4 KV heads split evenly over the two nodes, and each node's
    # own split of the same generation: the root's (its transfer time is real: it waits on the worker every
    # layer), and the worker's as the worker measured it, within the time the passes took
    root, other = cluster["nodes"]
    assert (root["address"], other["address"]) == ("root", address)
    assert root["share"] == other["share"] == 0.5
    assert root["inference_ms"] + root["transfer_ms"] == pytest.approx(last["avg_token_ms"])
    assert root["transfer_ms"] > 0
    assert other["inference_ms"] > 0 and other["transfer_ms"] > 0
    assert other["inference_ms"] + other["transfer_ms"] <= last["avg_token_ms"] + 0.2
    # /metrics: the same figures per node, node 1 the worker's own
    from prometheus_client.parser import text_string_to_metric_families

    gauges = {(s.name, s.labels["node"], s.labels["address"]): s.value
              for family in text_string_to_metric_families(scraped) for s in family.samples
              if s.name.startswith("dllama_node_")}
    for i, node in enumerate(cluster["nodes"]):
        for key in ("inference_ms", "transfer_ms"):
            assert gauges[(f"dllama_node_{key}", str(i), node["address"])] == pytest.approx(node[key])
