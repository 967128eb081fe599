"""Tool calling's two halves against real templates' text (tests/data/templates, see its README):
rendering `tools`, tool calls and tool results through the template, and parsing the model's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dllama.api.tools import ToolStream, parse_tool_calls, template_message
from dllama.chat import BUILTIN_TEMPLATES, ChatTemplate

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}


def _template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / name).read_text(), bos_token="<s>")


def _conversation(call_id="call_1"):
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "get_weather", "tool_call_id": call_id, "content": "4 C, rain"}]
    return [{**m, **template_message(m, j)} for j, m in enumerate(msgs)]


def test_which_templates_render_tools():
    assert _template("hermes_tools.jinja").supports_tools
    assert _template("llama3_1_json_tools.jinja").supports_tools
    for builtin in BUILTIN_TEMPLATES:
        assert not ChatTemplate(None, builtin=builtin).supports_tools


def test_hermes_template_renders_the_tools_the_call_and_the_result():
    text = _template("hermes_tools.jinja").render(_conversation(), tools=[WEATHER])
    assert "<tools> " in text and '"name": "get_weather"' in text and "city: str" in text
    # the assistant's call, its arguments as the object the model would write, then the tool's answer
    assert '<tool_call>\n{ "arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>' in text
    assert '<tool_response>\n{"name": "get_weather", "content": "4 C, rain"}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "<tools>" not in _template("hermes_tools.jinja").render(_conversation()[:1])


def test_llama31_template_renders_the_tools_the_call_and_the_result():
    text = _template("llama3_1_json_tools.jinja").render(_conversation(), tools=[WEATHER])
    assert "Environment: ipython" in text
    assert json.dumps(WEATHER, indent=4) in text   # the tool, as tojson(indent=4) writes it
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>' in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "4 C, rain"}<|eot_id|>' in text
    assert "Environment: ipython" not in _template("llama3_1_json_tools.jinja").render(_conversation()[:1])


def test_bad_tool_call_arguments_are_named():
    with pytest.raises(ValueError, match=r"messages\.1\.tool_calls\.0\.function\.arguments: not JSON"):
        template_message({"tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}, 1)
    with pytest.raises(ValueError, match=r"messages\.0\.tool_calls\.0: needs function\.name"):
        template_message({"tool_calls": [{"function": {}}]}, 0)


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_hermes_calls_and_the_text_around_them():
    out = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>')
    content, calls = parse_tool_calls(out)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Bergen"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # the end-of-turn token may come before the closing tag
    assert _calls(parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')[1]) == [("f", {})]


def test_parse_llama31_json_call():
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content is None and _calls(calls) == [("get_weather", {"city": "Oslo"})]
    content, calls = parse_tool_calls('<|python_tag|>{"name": "f", "arguments": {"x": 1}}')
    assert _calls(calls) == [("f", {"x": 1})]


@pytest.mark.parametrize("text", ["It is raining in Oslo.", '{"city": "Oslo"}', "<tool_call>{not json}</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>', "{'name': 'f'}"])
def test_other_replies_stay_content(text):
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", [
    "Hello there.", "a < b <tool", "  \n spaced reply", "{not json",
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
    'Let me check.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
    '<tool_call>{"name": "g", "arguments": {"x": "y"}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1}}',                 # the reply ended inside the block
    '{"name": "f", "parameters": {"a": 2}}', '<|python_tag|>{"name": "f", "parameters": {"a": 2}}',
])
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_a_streamed_reply_gives_what_the_whole_reply_parses_to(text, piece):
    """Fed in pieces of any size, ToolStream gives the calls parse_tool_calls finds in the whole reply, and
    the same content up to whitespace; a call goes out only once its block is complete."""
    ts, out = ToolStream(), []
    for k in range(0, len(text), piece):
        given = ts.feed(text[k:k + piece])
        if any(call for _, call in given):   # never before the block's end (or a JSON reply's end)
            assert "</tool_call>" in text[:k + piece]
        out += given
    out += ts.end()
    content, calls = parse_tool_calls(text)
    got = "".join(c for c, _ in out if c)
    assert got.split() == (content or "").split()
    assert [(c["function"]["name"], c["function"]["arguments"]) for _, c in out if c] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert ts.calls == len(calls)
