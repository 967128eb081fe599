"""What shapes a chat reply besides sampling: the tools offered to the model, a `tool_choice` that requires
a call, and a JSON `response_format`, the last two as llguidance matchers (dllama.grammar). 400s name the
field at fault."""

from __future__ import annotations

from dllama.api.errors import ApiError
from dllama.errors import DllamaError


def offered_tools(engine, body) -> list | None:
    """The tools to render, None when there are none to offer; 400 when the model's template cannot."""
    forced = forced_tool(body)
    if forced is not None and not body.tools:
        raise ApiError(400, "tool_choice asks for a call, but the request offers no tools", param="tool_choice",
                       code="invalid_value")
    if not body.tools or body.tool_choice == "none":
        return None
    for i, tool in enumerate(body.tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"tools.{i}: needs type 'function' and function.name", param=f"tools.{i}",
                           code="invalid_value")
    if not getattr(engine.chat, "supports_tools", False):
        raise ApiError(400, "tools: this model's chat template does not render tools, so tool calling is "
                       "not supported with this model", param="tools", code="unsupported")
    if isinstance(forced, str) and forced not in {t["function"]["name"] for t in body.tools}:
        raise ApiError(400, f"tool_choice names {forced!r}, which is not among the tools", param="tool_choice",
                       code="invalid_value")
    return body.tools


def forced_tool(body) -> str | bool | None:
    """What tool_choice requires: None (auto or none), True (a call to any tool), or the function's name."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return True
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', "
                       "'function': {'name': ...}}", param="tool_choice", code="invalid_value")
    return fn["name"]


def matchers(engine, response_format: dict | None, n: int, tools=None, forced=None):
    """The llguidance matchers (one per choice: each follows its own reply) a chat's response_format asks
    for, or its tool_choice when it requires a call (None for free text); a 400 naming what is wrong."""
    from dllama import grammar

    param = "tool_choice" if forced else "response_format"
    try:
        schema = grammar.schema_of(response_format or {})
        if schema is None and not forced:
            return None
        if schema is not None and forced:
            raise ApiError(400, "a tool_choice that requires a call and a JSON response_format cannot both "
                           "shape the reply", param="tool_choice", code="invalid_value")
        if not grammar.available():
            raise ApiError(400, f"{param} needs the llguidance package on the server (pip install "
                           "'dllama[grammar]')", param=param, code="unsupported")
        if forced:
            hermes = "<tool_call>" in (engine.chat.source or "")
            name = None if forced is True else forced
            return [grammar.tool_call_matcher(engine.tokenizer, engine.spec.vocab_size, tools, hermes, name)
                    for _ in range(n)]
        return [grammar.matcher_for(engine.tokenizer, engine.spec.vocab_size, schema) for _ in range(n)]
    except DllamaError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None
