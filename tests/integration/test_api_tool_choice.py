"""`tool_choice` that requires a call (`required`, or a named function), with SmolLM2 and the official
`openai` client: the reply is constrained (llguidance) to one call in the template's form, whose arguments
validate (the `jsonschema` package) against the function's `parameters`. SmolLM2's own template renders
no tools, so the model runs here under the Hermes tool template of tests/data/templates (both ChatML)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testlib import need_module

need_module("llguidance", "pip install 'dllama[grammar]'", module=True)
jsonschema = need_module("jsonschema", "pip install 'dllama[test]'", module=True)
openai = need_module("openai", "pip install 'dllama[test]'", module=True)
TestClient = need_module("fastapi.testclient", "pip install 'dllama[api]'", module=True).TestClient

pytestmark = [pytest.mark.slow]

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def client(smollm2_path):
    from dllama.api.routes import Service, create_app
    from dllama.api.runner import EngineRunner
    from dllama.chat import ChatTemplate
    from dllama.engine import Engine

    engine = Engine.open(smollm2_path, max_seq_len=1024)
    tok = engine.tokenizer
    engine._chat = ChatTemplate((TEMPLATES / "hermes_tools.jinja").read_text(),
                                eos_token=tok.token_bytes(tok.eos_ids[0]).decode())
    service = Service({"temperature": 0.0, "topp": 0.9, "seed": None})
    runner = EngineRunner(engine, 4)
    runner.start()
    service.ready(engine, runner)
    http = TestClient(create_app(service, max_body=1 << 20))
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    runner.stop()
    engine.close()


def _call(choice):
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMETERS[call.function.name])
    return call.function.name, args


@pytest.mark.parametrize("question", ["What is the weather in Oslo?", "Tell me a joke.", "What time is it in Tokyo?"])
def test_required_gives_a_valid_call_whatever_is_asked(client, question):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                       tools=[WEATHER, TIME], tool_choice="required", max_tokens=80)
    name, _ = _call(r.choices[0])
    assert name in PARAMETERS


def test_a_named_function_is_the_one_called_streamed_too(client):
    ask = dict(model="m", messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
               tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
               max_tokens=80)
    name, args = _call(client.chat.completions.create(**ask).choices[0])
    assert name == "get_time"
    calls, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **ask):
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(name, args)]   # greedy: the same call


@pytest.mark.parametrize("choice,match", [
    ({"type": "function", "function": {"name": "get_stock"}}, "not among the tools"),
    ({"type": "function"}, "must be"),
    ("sometimes", "must be"),
])
def test_a_tool_choice_that_cannot_be_met_is_a_400_naming_it(client, choice, match):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                       tool_choice=choice)
    assert exc.value.body["param"] == "tool_choice" and match in exc.value.body["message"]
