"""Uneven splits with real `dllama worker` processes on loopback, F32 buffers: node counts that are not
powers of two, more nodes than KV heads (nodes sharing a KV head), and weighted shares. Each run is held to
what 2 nodes promise against 1 (test_cluster.py's random model, test_cluster_smollm2.py's SmolLM2)."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_fixtures import start_workers  # noqa: F401  (fixture)
from test_cluster import _in_process_greedy, _run_greedy, model_files  # noqa: F401  (fixture)
from test_cluster_smollm2 import TOL_MAX, TOL_MEAN, _greedy

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_random_model_on_5_nodes_and_weighted_3(model_files, start_workers):
    """8 query heads on 4 KV heads: 5 nodes cut through KV groups; [1, 2, 5] moves most rows to node 2."""
    path, _ = model_files
    workers = start_workers(4)
    ids1, logits1 = _run_greedy(path, [])
    for n, weights in ((5, None), (3, [1, 2, 5])):
        ids, logits = _run_greedy(path, workers[:n - 1], "f32", weights=weights)
        # the sockets carry F32 exactly: what the same split gives in one process
        ids_local, logits_local = _in_process_greedy(path, n, weights=weights)
        assert ids_local == ids and np.array_equal(logits, logits_local), (n, weights)
        # the 2-node tolerance of test_cluster.py against one node
        np.testing.assert_allclose(logits, logits1, atol=0.03 * np.abs(logits1).max())
        assert ids == ids1, (n, weights)
        for w in workers:
            assert w.wait_idle()["state"] == "idle", w.log()


def test_smollm2_unpadded_on_6_and_weighted_3_nodes(smollm2_path, reference, start_workers):
    """SmolLM2's 3 KV heads as they are (no padding): 6 nodes, two to a KV head, and 3 nodes at 3:1:1."""
    workers = start_workers(5)
    case = next(c for c in reference["completions"] if c["name"] == "counting")
    prompt, steps = case["prompt_ids"], 6
    ids1, logits1 = _greedy(smollm2_path, [], prompt, steps)
    for n, weights in ((6, None), (3, [3, 1, 1])):
        _, logits = _greedy_weighted(smollm2_path, workers[:n - 1], prompt, steps, ids1, weights)
        diff = np.abs(logits - logits1)
        assert diff.mean(axis=1).max() <= TOL_MEAN, (n, diff.mean(axis=1).round(3))
        assert diff.max() <= TOL_MAX, (n, diff.max(axis=1).round(3))
        print(f"SmolLM2 on {n} nodes {weights}: mean |dlogit| {diff.mean():.3f}, max {diff.max():.3f}")


def _greedy_weighted(path, workers, prompt, steps, force, weights):
    from test_cluster import Root

    root = Root(path, [w.address for w in workers], "f32", weights=weights)
    try:
        return root.greedy(prompt, steps, force=force)
    finally:
        root.close()
        for w in workers:
            assert w.wait_idle()["state"] == "idle", w.log()


def test_cli_split_auto_prints_the_plan_and_generates_what_one_node_does(model_files, start_workers):
    import json

    from test_cluster import KEY_ARGS, _dllama

    path, tok = model_files
    workers = start_workers(2)
    common = ["inference", "--model", str(path), "--tokenizer", str(tok), "--prompt", "Hello world",
              "--steps", "6", "--temperature", "0", "--json", "--buffer-float-type", "f32"]
    res, errs = {}, {}
    cluster = ["--workers", *[w.address for w in workers], *KEY_ARGS]
    for name, extra in [("one", []), ("auto", ["--split", "auto", *cluster]), ("3,1,2", ["--split", "3,1,2", *cluster])]:
        proc = _dllama(*common, *extra)
        out, errs[name] = proc.communicate(timeout=180)
        assert proc.returncode == 0, errs[name]
        res[name] = json.loads(out)
        for w in workers:
            w.wait_idle()
    assert res["auto"]["generated_ids"] == res["one"]["generated_ids"] == res["3,1,2"]["generated_ids"]
    print(errs["auto"])
    lines = errs["auto"].splitlines()
    at = lines.index("split by measured speed:")
    assert lines[at + 1].startswith("  node 0 root: heads ")
    for i, w in enumerate(workers, start=1):
        assert lines[at + 1 + i].startswith(f"  node {i} {w.address}: heads "), errs["auto"]
        assert " Gvalues/s, expected " in lines[at + 1 + i]
    assert "  node 0 root: heads 4/8, ffn 256/512 (50%)" in errs["3,1,2"], errs["3,1,2"]


def test_cli_split_of_the_wrong_length_is_refused_before_connecting(model_files):
    from test_cluster import _dllama

    path, tok = model_files
    proc = _dllama("inference", "--model", str(path), "--tokenizer", str(tok), "--prompt", "Hi", "--steps", "1",
                   "--split", "1,1", "--workers", "127.0.0.1:1", "127.0.0.1:2")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    want = "dllama: error: --split '1,1': 2 weights for 3 nodes (the root and 2 workers)"
    assert err.strip().splitlines()[-1] == want
    assert "Traceback" not in err
