"""Request bodies of the OpenAI-compatible API, as pydantic models (they also make the OpenAPI spec).

The models accept every field OpenAI clients commonly send (unknown ones are ignored, as OpenAI-compatible
servers do), check types strictly, and leave "valid but unsupported" (images, tools on a template without
them) to the routes, which answer those with a 400 that names the feature instead of a schema error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Limits that keep one request from occupying the engine or the parser unreasonably; the context length
# (checked after tokenizing) is the real bound on prompts.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class _Body(BaseModel):
    # strict: "5" is not a number and "true" not a boolean; extra="ignore": clients send fields
    # (user, metadata, ...) that do not change what this server does.
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Body):
    """One part of a message's list-form content. Only `text` parts are supported."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = Field(None, description="An assistant's calls, as this API returned them")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, description="Optional; any name reaches the one served model, whose id "
                                                "the response reports (GET /v1/models lists it)")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (default: up to the context)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default: the server's --temperature)")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (default: the server's --topp)")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Same seed, same request: same reply")
    stop: str | list[str] | None = Field(None, description="Text that ends the reply; it is not part of it")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="Choices, each its own reply (at most 8); choice i uses seed + i")
    logprobs: bool | int | None = Field(None, description="Chat: true for the chosen tokens' log-probabilities; "
                                                        "completions: how many alternatives (0-5) with them")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Minus this from the logit of every "
                                                                         "token already generated")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Minus this times the count of "
                                                                          "each token already generated")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias in [-100, 100] added to "
                                                                 "its logit")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]   # an empty stop string would end every reply at once

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token, with logprobs")
    tools: list[dict] | None = Field(None, description="Functions the model may call; needs a chat template "
                                                       "that renders `tools`")
    tool_choice: str | dict | None = Field(None, description="'auto' (default), 'none', 'required' or "
                                                 "{'type': 'function', 'function': {'name': ...}}")
    functions: list[dict] | None = Field(None, description="Not supported (the older name of tools)")
    response_format: dict | None = Field(None, description="{'type': 'text'}, {'type': 'json_object'} or "
                                         "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}: "
                                         "the reply is constrained to JSON (that schema)")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(description="Text, a list of one text, or token ids")
    echo: bool = Field(False, description="Not supported")
    suffix: str | None = Field(None, description="Not supported")
    best_of: int | None = Field(None, ge=1, description="Only 1 is supported")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or lists of token ids (at most 64 inputs)")
    model: str | None = Field(None, description="Optional; the one served model answers")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Not supported (the model's width is the length)")


def check_limits(req: _Sampling) -> str | None:
    """A message naming what is too large in `req`, or None. (Pydantic's max_length on unions is clumsy.)"""
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        return f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}"
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        return f"stop: a stop string may have at most {MAX_STOP_CHARS} characters"
    return None


class ErrorDetail(BaseModel):
    message: str = Field(description="One line naming what was wrong")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(None, description="The request field at fault, dotted (messages.0.role)")
    code: str | None = Field(None, description="Machine-readable: context_length_exceeded, queue_full, ...")


class ErrorResponse(BaseModel):
    """Every error answer, in OpenAI's shape."""

    error: ErrorDetail
