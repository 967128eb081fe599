"""Constrained decoding (dllama/grammar.py) with SmolLM2's real vocabulary and no model: whatever the logits
say, the tokens the sampler lets through decode to JSON that the `jsonschema` package accepts, and end with
an end-of-turn token. Random logits are the adversary: unconstrained they give no JSON at all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from testlib import need_module

need_module("llguidance", "pip install 'dllama[grammar]'", module=True)
jsonschema = need_module("jsonschema", "pip install 'dllama[test]'", module=True)

from dllama import grammar  # noqa: E402
from dllama.errors import DllamaError  # noqa: E402
from dllama.sampler import Sampler  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}},
     "required": ["n", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
                                "additionalProperties": False}, "minItems": 1, "maxItems": 2},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from dllama.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_path)


def _run(tokenizer, schema, sampler, seed: int, limit: int = 200, pull=()) -> tuple[list[int], str]:
    m = grammar.matcher_for(tokenizer, tokenizer.vocab_size, schema)
    s = grammar.GrammarSampler(sampler, m, tokenizer.vocab_size)
    assert s.wants() == grammar.FULL_LOGITS
    rng, ids = np.random.default_rng(seed), []
    for _ in range(limit):
        # a strong pull towards one random token each step, as a confused model would give
        logits = rng.standard_normal(tokenizer.vocab_size).astype(np.float32)
        logits[rng.integers(tokenizer.vocab_size)] += 20
        for tok, bias in pull:
            logits[tok] += bias
        tok = s(logits)
        if tok in tokenizer.eos_ids:
            return ids, tokenizer.decode(ids)
        ids.append(tok)
    pytest.fail(f"no end-of-turn within {limit} tokens: {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
@pytest.mark.parametrize("sampler", [Sampler(0.0, 1.0), Sampler(1.0, 0.9, seed=3), Sampler(0.7, 1.0, seed=4)],
                         ids=["greedy", "top-p", "full"])
def test_masked_tokens_decode_to_json_that_validates(tokenizer, i, sampler):
    for seed in range(3):
        _, text = _run(tokenizer, SCHEMAS[i], sampler, seed)
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_json_object_gives_an_object(tokenizer):
    # keys are free text, so random logits alone would write one forever: a pull towards closing it
    pull = [(tokenizer.encode(t, add_bos=False)[0], b) for t, b in (('"', 30), ("}", 25))]
    for seed in range(3):
        _, text = _run(tokenizer, grammar.schema_of({"type": "json_object"}), Sampler(0.0, 1.0), seed, pull=pull)
        assert isinstance(json.loads(text), dict), text


def test_unconstrained_random_logits_are_not_json(tokenizer):
    # the check above can fail: the same logits without the mask give no JSON
    rng = np.random.default_rng(0)
    ids = [int(np.argmax(rng.standard_normal(tokenizer.vocab_size))) for _ in range(20)]
    with pytest.raises(ValueError):
        json.loads(tokenizer.decode(ids))


@pytest.mark.parametrize("fmt, words", [
    ({"type": "yaml"}, "'yaml'"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": 5}}, "schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}, "frob"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, "nowhere"),
])
def test_bad_formats_are_named(tokenizer, fmt, words):
    with pytest.raises(DllamaError, match="response_format") as exc:
        schema = grammar.schema_of(fmt)
        grammar.matcher_for(tokenizer, tokenizer.vocab_size, schema)
    assert words in str(exc.value)


def test_text_needs_no_grammar():
    assert grammar.schema_of({"type": "text"}) is None and grammar.schema_of({}) is None
