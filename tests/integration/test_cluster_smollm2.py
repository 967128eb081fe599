"""What 2 nodes promise against 1 on a real model: the README's padded SmolLM2 (q40 weights, KV heads padded
to 4), a real `dllama worker` on loopback, F32 buffers. docs/architecture.md ("Several nodes against one")
states it; these are its numbers.

The nodes add their partial sums in another order, and the 8-bit activations that quantized weights multiply
round a value the other way now and then, so the logits are not bit-identical. How far apart they may be is
measured against llama.cpp's logits for the same prompts (tests/data): the padded model (its Q4_1 weights
re-quantized to Q40) is itself some way from llama.cpp on the original file, and the cluster must stay well
inside that: at every step 2 nodes differ from 1 by at most HALF_GAP of 1 node's mean distance from llama.cpp
on average and TOL_MAX for any single logit; at the first step 2 nodes are no further from llama.cpp than 1
node is, within NO_FURTHER. The greedy token is the same wherever one node's top-1 leads its runner-up by at
least TIE; at a nearer tie the two may part, and their texts differ from there on.
"""

from __future__ import annotations

import numpy as np
import pytest
from cluster_fixtures import start_workers  # noqa: F401  (fixture)
from test_cluster import Root

pytestmark = [pytest.mark.network, pytest.mark.slow]

# Measured, 2 nodes against 1 (Zen 4 AVX-512, and Sapphire Rapids AVX-512 and AVX2 builds), mean |diff| per step:
# at most 1.08 on "capital_france" (1 node's distance from llama.cpp there: 2.69) and 0.33 on "counting" (1.06).
HALF_GAP = 0.5
NO_FURTHER = 1.25   # 2 nodes' distance from llama.cpp at the first step / 1 node's (measured: 0.97-1.13)
TOL_MAX = 3.0    # any single logit (measured: at most 2.27)
TOL_MEAN = 1.0   # mean |diff| per step where no llama.cpp logits set the scale (test_cluster_uneven.py's runs)
TIE = 1.0        # a top-1 lead below this is a near-tie (measured: the runner-up gains at most 0.61)
# llama.cpp's prompts: "counting" has no near-tie for many steps (its tokens are compared at every one);
# "The capital of France is" starts at one (0.11), where the two generate different texts.
CASES = {"counting": 12, "capital_france": 6}


@pytest.fixture(scope="module")
def padded_smollm2(smollm2_path, tmp_path_factory):
    """What the README's cluster demo converts: SmolLM2 with its 3 KV heads padded to 4, q40 weights."""
    from dllama.formats.convert import convert

    path = tmp_path_factory.mktemp("smollm2") / "smollm2_135m_4kv.m"
    convert(smollm2_path, str(path), pad_kv_heads=4)
    return path


def _greedy(path, workers, prompt, steps, force=None):
    root = Root(path, [w.address for w in workers], "f32")
    try:
        return root.greedy(prompt, steps, force=force)
    finally:
        root.close()
        for w in workers:   # the next root finds it idle, not still closing this session
            assert w.wait_idle()["state"] == "idle", w.log()


def test_two_nodes_match_one_within_the_stated_tolerance(padded_smollm2, reference, reference_logits, start_workers):
    (worker,) = start_workers(1)
    compared = 0
    for case in reference["completions"]:
        steps = CASES.get(case["name"])
        if steps is None:
            continue
        prompt = case["prompt_ids"]
        ids1, logits1 = _greedy(padded_smollm2, [], prompt, steps)
        # the same tokens fed to 2 nodes, so that the logits compare at every step, past any parting
        _, logits2 = _greedy(padded_smollm2, [worker], prompt, steps, force=ids1)
        gap1, gap2 = (float(np.abs(lg[0] - reference_logits[case["name"]]).mean()) for lg in (logits1, logits2))
        assert gap2 <= NO_FURTHER * gap1, (case["name"], gap1, gap2)
        diff = np.abs(logits2 - logits1)
        assert diff.mean(axis=1).max() <= HALF_GAP * gap1, (case["name"], gap1, diff.mean(axis=1).round(3))
        assert diff.max() <= TOL_MAX, (case["name"], diff.max(axis=1).round(3))

        ids2, _ = _greedy(padded_smollm2, [worker], prompt, steps)
        top2 = np.sort(logits1, axis=1)[:, -2:]
        near_ties = np.flatnonzero(top2[:, 1] - top2[:, 0] < TIE)
        sure = int(near_ties[0]) if near_ties.size else steps
        assert ids2[:sure] == ids1[:sure], (case["name"], ids1, ids2, (top2[:, 1] - top2[:, 0]).round(3))
        compared += sure
    assert compared >= 8, "the prompts leave too few steps before a near-tie to say anything about tokens"
