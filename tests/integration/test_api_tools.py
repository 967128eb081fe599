"""A tool-calling round trip with the official `openai` client: the app in-process, a real template that
renders tools (tests/data/templates/hermes_tools.jinja) and a stand-in engine that answers the rendered
prompt as a tool-calling model would (a call when it sees the tools, a sentence when it sees the result),
so what is tested is the API: the tools reach the prompt, the output becomes `tool_calls`, and the call and
its result come back through the template."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from testlib import need_module

TestClient = need_module("fastapi.testclient", "pip install 'dllama[api]'", module=True).TestClient
openai = need_module("openai", "pip install 'dllama[test]'", module=True)

from dllama.api.routes import Service, create_app  # noqa: E402
from dllama.api.runner import EngineRunner  # noqa: E402
from dllama.chat import ChatTemplate  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"
EOS = 256
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
ANSWER = "It is 4 C and raining in Oslo."


class _Bytes:
    """One token per byte and an end-of-turn token."""

    eos_ids, add_bos = [EOS], False

    def encode(self, text, add_bos=None, parse_special=True):
        return list(text.encode())

    def token_bytes(self, token_id):
        return bytes([token_id]) if token_id < EOS else b""


class _ToolModel:
    def __init__(self, template: str):
        self.name, self.seq_len = "tool-model", 16384
        self.spec = SimpleNamespace(vocab_size=EOS + 1)
        self.tokenizer = _Bytes()
        self.chat = ChatTemplate((TEMPLATES / template).read_text()) if template else _NoTools()
        self.stats = SimpleNamespace(summary=dict)
        self.prompts = []
        self.reply = CALL   # the answer to a prompt that offers tools

    def generate(self, prompt_ids, max_tokens, sampler, stop_ids=None):
        prompt = bytes(prompt_ids).decode()
        self.prompts.append(prompt)
        reply = ANSWER if "<tool_response>" in prompt else self.reply if "<tools>" in prompt else "Hello."
        yield from reply.encode()
        yield EOS


class _NoTools:
    supports_tools = False

    def prompt_ids(self, tokenizer, messages, add_generation_prompt=True, **extra):
        return tokenizer.encode("".join(m["content"] for m in messages))


def _client(template):
    engine = _ToolModel(template)
    service = Service({"temperature": 0.0, "topp": 0.9, "seed": None})
    runner = EngineRunner(engine, 4)
    runner.start()
    service.ready(engine, runner)
    http = TestClient(create_app(service, max_body=1 << 20))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), \
        engine, runner


@pytest.fixture
def hermes():
    client, engine, runner = _client("hermes_tools.jinja")
    yield client, engine
    runner.stop()


def test_a_tool_call_round_trip(hermes):
    client, engine = hermes
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER])
    assert '"name": "get_weather"' in engine.prompts[-1] and "city: str" in engine.prompts[-1]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}

    follow = ask + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "4 C, rain"}]
    r2 = client.chat.completions.create(model="m", messages=follow, tools=[WEATHER])
    prompt = engine.prompts[-1]
    # the call went back through the template as the model wrote it, the result named after its function
    assert '<tool_call>\n{ "arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>' in prompt
    assert '<tool_response>\n{"name": "get_weather", "content": "4 C, rain"}\n</tool_response>' in prompt
    assert r2.choices[0].message.content == ANSWER and not r2.choices[0].message.tool_calls
    assert r2.choices[0].finish_reason == "stop"


def test_a_streamed_tool_call(hermes):
    client, _ = hermes
    calls, finish = [], None
    for chunk in client.chat.completions.create(model="m", stream=True, tools=[WEATHER],
                                                messages=[{"role": "user", "content": "Oslo?"}]):
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and [c.index for c in calls] == [0]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Oslo"}


def test_streamed_content_comes_before_the_call_is_complete(hermes):
    """A reply that says something and then calls: the words stream as they come, ahead of the call, which
    is sent once, whole, when its block closes; the reply without streaming is the same message."""
    client, engine = hermes
    engine.reply = "Let me look that up.\n" + CALL
    ask = dict(model="m", tools=[WEATHER], messages=[{"role": "user", "content": "Oslo?"}])
    deltas = []
    for chunk in client.chat.completions.create(stream=True, **ask):
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(("content", c.delta.content))
            deltas += [("call", call) for call in c.delta.tool_calls or []]
            if c.finish_reason:
                deltas.append(("finish", c.finish_reason))
    # one token per byte: the content arrives in pieces, all before the call
    kinds = [k for k, _ in deltas]
    assert kinds.count("content") > 1 and kinds[-2:] == ["call", "finish"] and kinds.count("call") == 1
    assert "".join(v for k, v in deltas if k == "content") == "Let me look that up."
    call = deltas[-2][1]
    assert call.index == 0 and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"} and deltas[-1][1] == "tool_calls"
    message = client.chat.completions.create(**ask).choices[0].message
    assert message.content == "Let me look that up." and message.tool_calls[0].function.name == "get_weather"


def test_without_tools_or_with_tool_choice_none_the_reply_is_text(hermes):
    client, engine = hermes
    ask = [{"role": "user", "content": "Oslo?"}]
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        r = client.chat.completions.create(model="m", messages=ask, **extra)
        assert "<tools>" not in engine.prompts[-1] and r.choices[0].message.content == "Hello."


def test_tools_on_a_template_without_them_are_a_400():
    client, _, runner = _client(None)
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
        assert exc.value.body["param"] == "tools" and "does not render tools" in exc.value.body["message"]
        with pytest.raises(openai.BadRequestError) as exc:   # a call required, and no way to offer one
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                           tool_choice="required")
        assert exc.value.body["param"] == "tools"
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                           tool_choice="required")
        assert exc.value.body["param"] == "tool_choice" and "offers no tools" in exc.value.body["message"]
    finally:
        runner.stop()
