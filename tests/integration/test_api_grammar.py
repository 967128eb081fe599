"""`response_format` with SmolLM2 and the official `openai` client: JSON-schema replies validate (checked
by the `jsonschema` package) on 20 prompts with varied schemas, sent four at a time to `--parallel 4`, so
every slot runs its own matcher in shared forward passes; `json_object` gives a JSON object; a broken
schema is a 400 naming it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from testlib import need_module
from test_api_openai import SEQ_LEN, openai, running_server

need_module("llguidance", "pip install 'dllama[grammar]'", module=True)
jsonschema = need_module("jsonschema", "pip install 'dllama[test]'", module=True)

pytestmark = [pytest.mark.slow, pytest.mark.network]

MAX_TOKENS = 96


def _obj(required: dict, **optional) -> dict:
    return {"type": "object", "properties": {**required, **optional}, "required": list(required),
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 24}
CASES = [
    ("Describe a cat.", _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 30}})),
    ("Is the sky green? Answer in JSON.", _obj({"answer": {"type": "boolean"}})),
    ("Pick a primary color.", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("List three fruits.", _obj({"fruits": {"type": "array", "items": NAME, "minItems": 3, "maxItems": 3}})),
    ("What is 2 + 2?", _obj({"result": {"type": "number"}})),
    ("Give the capital of France and its country.", _obj({"city": NAME, "country": NAME})),
    ("Describe a book: title, author and year.",
     _obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1000, "maximum": 2100}})),
    ("Rate this movie from 1 to 5: a quiet film about a lighthouse.",
     _obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "why": NAME})),
    ("Give a point on a map.", _obj({"lat": {"type": "number"}, "lon": {"type": "number"}})),
    ("Name two planets with their order from the sun.",
     _obj({"planets": {"type": "array", "maxItems": 2, "minItems": 1,
                       "items": _obj({"name": NAME, "order": {"type": "integer", "minimum": 1, "maximum": 8}})}})),
    ("Describe a person with an address.",
     _obj({"name": NAME, "address": _obj({"street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("Classify the sentiment of: I love sunny days.",
     _obj({"sentiment": {"enum": ["positive", "negative", "neutral"]},
           "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("Give a list of small numbers.", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                       "minItems": 1, "maxItems": 5}),
    ("Say yes or no.", {"enum": ["yes", "no"]}),
    ("Describe the weather today.", _obj({"summary": NAME, "temperature_c": {"type": "integer", "minimum": -40,
                                                                             "maximum": 50}},
                                         wind={"enum": ["calm", "breezy", "stormy"]})),
    ("Make a to-do item.", _obj({"task": NAME, "done": {"type": "boolean"},
                                 "priority": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3},
                                                        {"type": "null"}]}})),
    ("Give the RGB values of orange.", _obj({"rgb": {"type": "array", "minItems": 3, "maxItems": 3,
                                                     "items": {"type": "integer", "minimum": 0, "maximum": 255}}})),
    ("Translate 'hello' to Spanish.", _obj({"source": NAME, "target": NAME, "language": {"const": "es"}})),
    ("Name a dog and list its tricks.",
     _obj({"dog": _obj({"name": NAME, "tricks": {"type": "array", "items": {"enum": ["sit", "roll", "fetch"]},
                                                 "maxItems": 3}})})),
    ("Give a date.", _obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                          "month": {"type": "integer", "minimum": 1, "maximum": 12},
                          "day": {"type": "integer", "minimum": 1, "maximum": 28}})),
]


@pytest.fixture(scope="module")
def client(smollm2_path):
    with running_server(smollm2_path, "--nthreads", "1", "--max-seq-len", str(SEQ_LEN), "--parallel", "4",
                        "--queue-size", "24", "--temperature", "0") as base:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300) as c:
            yield c


def _ask(client, prompt: str, fmt: dict):
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=MAX_TOKENS, response_format=fmt)


def test_json_schema_replies_validate(client):
    def one(case):
        prompt, schema = case
        r = _ask(client, prompt, {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema,
                                                                         "strict": True}})
        return r.choices[0]

    with ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(one, CASES))
    for (prompt, schema), choice in zip(CASES, choices):
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_replies_parse(client):
    for prompt in ("Describe a house in JSON with its color and number of rooms.", "Tell me about the moon."):
        choice = _ask(client, prompt, {"type": "json_object"}).choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}, "frob"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/gone"}}}, "gone"),
    ({"type": "xml"}, "xml"),
])
def test_bad_schema_is_400_naming_it(client, fmt, words):
    with pytest.raises(openai.BadRequestError) as exc:
        _ask(client, "hi", fmt)
    err = exc.value.body
    assert err["param"] == "response_format" and words in err["message"], err


def test_one_slot_server_streams_the_same_constrained_replies(client, smollm2_path):
    # the unbatched path (Engine.generate) and streaming: the same greedy JSON as the batched one gave
    cases = CASES[:3]
    fmts = [{"type": "json_schema", "json_schema": {"name": "reply", "schema": s}} for _, s in cases]
    batched = [_ask(client, p, f).choices[0].message.content for (p, _), f in zip(cases, fmts)]
    with running_server(smollm2_path, "--nthreads", "1", "--max-seq-len", str(SEQ_LEN), "--temperature", "0") as base:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300) as one:
            for (prompt, schema), fmt, want in zip(cases, fmts, batched):
                stream = one.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                                     temperature=0, max_tokens=MAX_TOKENS, response_format=fmt,
                                                     stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                assert text == want
                jsonschema.validate(json.loads(text), schema)


def test_without_llguidance_a_json_format_is_400_saying_what_to_install(monkeypatch):
    from test_api_requests import CHAT, HELLO, TestClient, _app, _assert_error

    from dllama import grammar

    monkeypatch.setattr(grammar, "available", lambda: False)
    app, engine, runner = _app()
    engine.release.set()
    try:
        with TestClient(app) as c:
            err = _assert_error(c.post(CHAT, json={"messages": HELLO, "response_format": {"type": "json_object"}}),
                                400, "response_format")
            assert "llguidance" in err["message"] and err["code"] == "unsupported"
            # plain text needs no grammar library
            assert c.post(CHAT, json={"messages": HELLO, "response_format": {"type": "text"}}).status_code == 200
    finally:
        runner.stop()
