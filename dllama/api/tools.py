"""Tool calling: the request's `tools` and tool messages into the chat template, the model's reply into
OpenAI `tool_calls`.

The template does the rendering (Hugging Face's convention: a `tools` variable, assistant messages with
`tool_calls` whose `arguments` are objects, `tool` messages with the function's `name`). Two output forms
are recognised:
- Hermes / Qwen 2.5: any number of ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
  with text around them kept as the message's content;
- Llama 3.1 / 3.2 JSON: the whole reply is ``{"name": ..., "parameters": {...}}`` (after an optional
  ``<|python_tag|>``).
A reply in neither form is plain content.
"""

from __future__ import annotations

import json
import re
import uuid

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def template_message(m: dict, j: int) -> dict:
    """An API message's tool fields as templates read them; ValueError naming a malformed one."""
    out = {}
    if m.get("tool_calls"):
        calls = []
        for k, call in enumerate(m["tool_calls"]):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"messages.{j}.tool_calls.{k}: needs function.name")
            args = fn.get("arguments", {})
            if isinstance(args, str):   # OpenAI sends the arguments as JSON text; templates expect an object
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise ValueError(f"messages.{j}.tool_calls.{k}.function.arguments: not JSON") from None
            calls.append({"id": call.get("id"), "type": "function",
                          "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = calls
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def name_tool_results(messages: list[dict]) -> None:
    """Give each `tool` message without a `name` the name of the call it answers (OpenAI clients send only
    `tool_call_id`; some templates, Hermes' among them, print the function's name with the result)."""
    names = {}
    for m in messages:
        for call in m.get("tool_calls", ()):
            names[call.get("id")] = call["function"]["name"]
        if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]


def _call(name, args) -> dict | None:
    if not isinstance(name, str) or not name or not isinstance(args, (dict, str)):
        return None
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _object(text: str):
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply; content None when the reply is only tool calls."""
    calls = []
    if "<tool_call>" in text:
        for m in _HERMES.finditer(text):
            obj = _object(m.group(1))
            call = obj and _call(obj.get("name"), obj.get("arguments", {}))
            if call is None:   # a malformed block: leave the reply as the model wrote it
                return text, []
            calls.append(call)
        rest = _HERMES.sub("", text).strip()
        return rest or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    obj = _object(body) if body.startswith("{") else None
    if obj is not None and "name" in obj and ("parameters" in obj or "arguments" in obj):
        call = _call(obj["name"], obj.get("parameters", obj.get("arguments")))
        if call is not None:
            return None, [call]
    return text, []


_OPEN, _CLOSE, _PYTHON_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"


class ToolStream:
    """A reply's text as it streams with tools offered: the content goes out as it comes, what may be a tool
    call is held until it is complete and goes out as one call (OpenAI's streamed `tool_calls` deltas).

    `feed(text)` and, at the end, `end()` return [(content or None, call or None)]. A Hermes block is given
    when its `</tool_call>` arrives; a reply that starts as a Llama 3.1 JSON call (`{` or `<|python_tag|>`)
    is held to the end, as only the whole reply can say whether it is one. The content is what
    parse_tool_calls() would give, whitespace at the calls aside."""

    def __init__(self):
        self._held = ""
        self._json = None     # None: undecided until the reply's first visible characters
        self.calls = 0        # calls given so far

    def feed(self, text: str) -> list[tuple]:
        self._held += text
        return self._drain(final=False)

    def end(self) -> list[tuple]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple]:
        if self._json is None:
            start = self._held.lstrip()
            if not final and (not start or _PYTHON_TAG.startswith(start)):
                return []
            self._json = start.startswith(("{", _PYTHON_TAG))
        if self._json:
            if not final:
                return []
            content, calls = parse_tool_calls(self._held)
            self.calls += len(calls)
            return [(content, None)] * (content is not None) + [(None, c) for c in calls]
        out = []
        while True:
            i = self._held.find(_OPEN)
            j = self._held.find(_CLOSE, i) if i >= 0 else -1
            if i >= 0 and (j >= 0 or final):   # a whole block, or one the reply ended in
                end = j + len(_CLOSE) if j >= 0 else len(self._held)
                if self._held[:i].strip():
                    out.append((self._held[:i].rstrip(), None))
                obj = _object(self._held[i + len(_OPEN):end - len(_CLOSE) if j >= 0 else end].strip())
                call = obj and _call(obj.get("name"), obj.get("arguments", {}))
                if call is None:   # a malformed block: given as the model wrote it
                    out.append((self._held[i:end], None))
                else:
                    out.append((None, call))
                    self.calls += 1
                self._held = self._held[end:]
                continue
            # no whole block: the text before what may become one goes out up to its last visible character
            # (whitespace beside a call is not content)
            stop = i if i >= 0 else len(self._held) - (0 if final else _partial_suffix(self._held, _OPEN))
            text = self._held[:stop] if final else self._held[:stop].rstrip()
            if text.strip():
                out.append((text, None))
                self._held = self._held[len(text):]
            if final:
                self._held = ""
            return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a start of `marker` (0 when none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
