"""logprobs, logit_bias and /v1/embeddings on a cluster (the root and a worker on loopback) equal what the
same model gives on one node: the full logits and the root's final hidden state are what they read."""

from __future__ import annotations

import numpy as np
import pytest
from test_api_cluster import split_model, worker  # noqa: F401  (split_model is a fixture)
from test_api_openai import httpx, running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _ask(base: str) -> dict:
    out = {}
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "logprobs": 3}).json()
    out["text"], out["logprobs"] = r["choices"][0]["text"], r["choices"][0]["logprobs"]
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0, "logit_bias": {"42": 100}}).json()
    out["biased"] = r["choices"][0]["text"]
    r = httpx.post(f"{base}/v1/embeddings", timeout=120, json={"input": ["Once upon a time", "a fox"]}).json()
    out["embeddings"] = [np.array(d["embedding"]) for d in r["data"]]
    return out


def test_cluster_answers_as_one_node(split_model, smollm2_path):  # noqa: F811
    common = ["--tokenizer", smollm2_path, "--nthreads", "1", "--max-seq-len", "128", "--buffer-float-type", "f32"]
    with running_server(split_model, *common) as base:
        local = _ask(base)
    with worker() as address, running_server(split_model, *common, "--workers", address) as base:
        split = _ask(base)
    assert split["text"] == local["text"] and split["biased"] == local["biased"]
    assert split["logprobs"]["tokens"] == local["logprobs"]["tokens"]
    np.testing.assert_allclose(split["logprobs"]["token_logprobs"], local["logprobs"]["token_logprobs"], atol=1e-3)
    for a, b in zip(split["embeddings"], local["embeddings"]):
        assert a.size == 576
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
