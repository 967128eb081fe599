"""The request's additions to sampling (dllama/api/sampling.py) against OpenAI's written definitions,
computed here by hand on small logits vectors."""

from __future__ import annotations

import numpy as np
import pytest

from dllama.api.sampling import RequestSampler, completion_logprobs, parse_logit_bias
from dllama.model.collective import FULL_LOGITS
from dllama.sampler import Sampler


class _Recording:
    """A base sampler that returns a fixed sequence and keeps the logits it was shown."""

    def __init__(self, tokens):
        self.tokens, self.seen = list(tokens), []

    def wants(self):
        return (2, 0.0, 1)

    def __call__(self, logits):
        self.seen.append(np.array(logits, copy=True))
        return self.tokens.pop(0)


def test_penalties_follow_openais_definition():
    logits = np.array([1.0, 2.0, 3.0, 0.5, -1.0], np.float32)
    base = _Recording([2, 2, 1, 2, 0])
    s = RequestSampler(base, logits.size, presence=0.25, frequency=0.5)
    chosen = [s(logits) for _ in range(5)]
    counts = np.zeros(logits.size)
    for tok, seen in zip(chosen, base.seen):
        # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence, c over the tokens generated so far
        want = logits - counts * 0.5 - (counts > 0) * 0.25
        np.testing.assert_allclose(seen, want, rtol=0, atol=1e-6)
        counts[tok] += 1
    np.testing.assert_array_equal(logits, [1.0, 2.0, 3.0, 0.5, -1.0])   # the engine's logits stay untouched


def test_logit_bias_is_added_and_forces_a_token_under_greedy():
    logits = np.array([5.0, 1.0, 0.0, -3.0], np.float32)
    s = RequestSampler(Sampler(0.0), logits.size, bias={3: 100.0, 0: -100.0})
    assert s.wants() == FULL_LOGITS
    assert s(logits) == 3
    assert RequestSampler(Sampler(0.0), 4, bias={0: -100.0})(logits) == 1


def test_logprobs_are_the_raw_logits_log_softmax_whatever_the_bias():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32) * 4
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    s = RequestSampler(Sampler(0.0), logits.size, top_logprobs=3, bias={7: 100.0}, unreported={9})
    assert s(logits) == 7
    ((tok, lp, top),) = s.take()
    assert tok == 7 and lp == pytest.approx(ref[7], abs=1e-5)
    assert [t for t, _ in top] == list(np.argsort(-ref)[:3])
    assert [v for _, v in top] == pytest.approx(np.sort(ref)[::-1][:3], abs=1e-5)
    assert s.take() == []
    # an end-of-turn token is not part of the reply: not reported
    s9 = RequestSampler(_Recording([9]), 50, top_logprobs=0, unreported={9})
    s9(logits)
    assert s9.take() == []


def test_without_additions_the_base_decides_what_the_output_layer_returns():
    base = Sampler(0.0)
    assert RequestSampler(base, 10).wants() == base.wants()
    assert RequestSampler(base, 10, top_logprobs=0).wants() == FULL_LOGITS
    assert RequestSampler(base, 10, frequency=0.1).wants() == FULL_LOGITS


@pytest.mark.parametrize("bias, message", [({"x": 1}, "'x' is not a token id"),
                                           ({"10": 1}, "token id 10 is not in the vocabulary"),
                                           ({"-1": 1}, "token id -1 is not in the vocabulary"),
                                           ({"3": 101}, "must be in [-100, 100]")])
def test_bad_logit_bias_is_named(bias, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_logit_bias(bias, 10)
    assert parse_logit_bias({"3": -2}, 10) == {3: -2.0}


def test_completion_logprobs_shape():
    class Tok:
        def token_bytes(self, t):
            return [b"Hel", b"lo", b"!"][t]

    out = completion_logprobs(Tok(), [(0, -0.5, [(0, -0.5), (2, -1.5)]), (1, -0.1, [(1, -0.1), (0, -3.0)])])
    assert out == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -0.1],
                   "top_logprobs": [{"Hel": -0.5, "!": -1.5}, {"lo": -0.1, "Hel": -3.0}], "text_offset": [0, 3]}


@pytest.mark.parametrize("scale", [0.0, 0.01, 1.0, 30.0])
def test_top_logprobs_are_the_best_tokens_whatever_the_spread(scale):
    rng = np.random.default_rng(int(scale * 100))
    logits = (rng.normal(size=5000) * scale).astype(np.float32)
    logits[[7, 99]] = -np.inf
    s = RequestSampler(Sampler(0.0), logits.size, top_logprobs=20)
    s(logits)
    ((_, _, top),) = s.take()
    assert [t for t, _ in top] == list(np.argsort(-logits, kind="stable")[:20])
