"""Each worker's own compute and network time per token (protocol TIMES), with a real `dllama worker`
process on loopback: the figures the root shows for a worker are the worker's, add up to no more than the
passes took, and follow the share of the model the worker computes."""

from __future__ import annotations

import pytest
from cluster_fixtures import KEY, random_cluster_model, start_workers  # noqa: F401  (fixture)

pytestmark = [pytest.mark.network, pytest.mark.slow]

PROMPT = [256, 72, 101, 108, 108, 111]
TOKENS = 16


@pytest.fixture(scope="module")
def ffn_model(tmp_path_factory):
    """A random Q40 model whose decode pass is mostly FFN matmuls (hidden 16384 on dim 2048): a node's compute
    follows its share of the FFN rows, well above the per-layer overhead of the forward pass."""
    path, tok = random_cluster_model(tmp_path_factory.mktemp("timings"), dim=2048, hidden_dim=16384, n_layers=1)
    return str(path), str(tok)


def _generate(model, worker, split):
    """The summary of TOKENS greedy tokens with `split` weights (root, worker)."""
    from dllama.engine import Engine
    from dllama.sampler import Sampler

    path, tok = model
    engine = Engine.open(path, tok, workers=[worker.address], cluster_key=KEY, split=split)
    try:
        ids = list(engine.generate(PROMPT, TOKENS, Sampler(0.0, 1.0, seed=0), stop_ids=[]))
        assert len(ids) == TOKENS
        return engine.stats.summary()
    finally:
        engine.close()
        assert worker.wait_idle()["state"] == "idle", worker.log()


def test_a_workers_own_times_add_up_and_follow_its_share(ffn_model, start_workers):
    [worker] = start_workers(1)
    _generate(ffn_model, worker, [1, 1])   # whatever the first passes load or compile is not measured
    runs = {"small": [], "large": []}
    for _ in range(2):   # alternated, so a load that comes and goes weighs on both shares alike
        for name, split in (("small", [7, 1]), ("large", [1, 7])):
            runs[name].append(_generate(ffn_model, worker, split))
    for st in runs["small"] + runs["large"]:
        root, node = st["nodes"]
        assert root["inference_ms"] + root["transfer_ms"] == pytest.approx(st["avg_token_ms"])
        # the worker's own clock: it computed, it waited on the root, and its time inside the decode
        # passes fits within what those passes took on the root (plus its report's lag: the prompt's
        # gather send, well under a millisecond on loopback)
        assert node["inference_ms"] > 0 and node["transfer_ms"] > 0
        assert node["inference_ms"] + node["transfer_ms"] <= st["avg_token_ms"] + 1.0 / (TOKENS - 1)
    # seven times the FFN rows: more of the worker's time computing, and the root's less
    small = sum(r["nodes"][1]["inference_ms"] for r in runs["small"])
    large = sum(r["nodes"][1]["inference_ms"] for r in runs["large"])
    root_small = sum(r["nodes"][0]["inference_ms"] for r in runs["small"])
    root_large = sum(r["nodes"][0]["inference_ms"] for r in runs["large"])
    print(f"worker compute ms/token: {small / 2:.2f} at 1/8 of the FFN, {large / 2:.2f} at 7/8; "
          f"root: {root_small / 2:.2f}, {root_large / 2:.2f}")
    assert large > 1.5 * small and root_small > root_large
