"""Constrained decoding: OpenAI's `response_format` (JSON object, JSON schema) and a `tool_choice` that
requires a call, through llguidance.

llguidance (Microsoft; Rust core, used by llama.cpp and vLLM) compiles a JSON schema into a grammar and,
each step, computes which tokens of the vocabulary may come next (a bitmask, one bit per token id). The
vocabulary is handed over as each token's bytes, from dllama's own tokenizer, so no HF tokenizer or torch
is involved. `GrammarSampler` wraps a request's sampler: it masks the full logits, lets the inner sampler
choose, and advances the matcher with the chosen token. Once the grammar is complete only the end-of-turn
tokens remain allowed, so the reply ends where the JSON does. Each request (each --parallel slot) has its
own matcher; the tokenizer side is built once per vocabulary and shared.
"""

from __future__ import annotations

import threading
import weakref

import numba
import numpy as np

from dllama.errors import DllamaError
from dllama.model.collective import FULL_LOGITS

# Compact separators: a small model that may add free whitespace tends to add a lot of it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_tokenizers = weakref.WeakKeyDictionary()   # dllama Tokenizer -> {vocabulary size: llguidance.LLTokenizer}


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def schema_of(response_format: dict) -> dict | None:
    """The JSON schema an OpenAI `response_format` asks for; None for plain text. DllamaError naming the
    field at fault otherwise."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise DllamaError(f"response_format.type {kind!r} is not supported (text, json_object, json_schema are)")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise DllamaError("response_format.json_schema must be an object with a 'schema'")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise DllamaError("response_format.json_schema.schema must be a JSON schema object")
    return {} if schema is True else schema


def _llg_tokenizer(tokenizer, n_vocab: int):
    import llguidance

    with _lock:
        known = _tokenizers.setdefault(tokenizer, {})
        tok = known.get(n_vocab)
        if tok is None:
            # one end token, the model's own (llguidance before 1.7, the newest with wheels for a glibc
            # older than 2.31, takes no list): what the grammar allows once the JSON is complete
            tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokenizer, n_vocab)), n_vocab=n_vocab,
                                         eos_token=_end_token(tokenizer))
            _warm_up(llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema({}), log_level=0),
                     n_vocab)
            known[n_vocab] = tok
    return tok


def _warm_up(matcher, n_vocab: int) -> None:
    # The first mask of a vocabulary builds llguidance's token tables and the first _apply_mask compiles
    # or loads the kernel: well over 0.5 s, spent here (off the event loop) rather than in the engine
    # thread, where every running slot would wait for it.
    mask = np.zeros((n_vocab + 31) // 32, np.int32)
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    _apply_mask(np.zeros(n_vocab, np.float32), mask)


def _end_token(tokenizer) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.eos_ids[0]


class _Vocab:
    """dllama's tokenizer in the shape llguidance.TokenizerWrapper reads: each id's bytes, special tokens
    marked with a leading 0xFF (llguidance's convention, so that their text never matches JSON)."""

    def __init__(self, tokenizer, n_vocab: int):
        self._tokenizer = tokenizer
        self.eos_token_id = _end_token(tokenizer)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.tokens = [(b"\xff" + tokenizer.token_bytes(i)) if tokenizer.is_special(i) else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)] + [b""] * max(0, n_vocab - tokenizer.vocab_size)

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_bos=False, parse_special=False)


def matcher_for(tokenizer, n_vocab: int, schema: dict):
    """A fresh llguidance matcher for `schema`; DllamaError naming what is wrong with the schema."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - the Rust side's errors surface as several Python types
        raise DllamaError(f"response_format.json_schema.schema: {_one_line(str(exc))}") from None
    matcher = llguidance.LLMatcher(_llg_tokenizer(tokenizer, n_vocab), grammar, log_level=0)
    if matcher.is_error():
        raise DllamaError(f"response_format.json_schema.schema is not usable: {_one_line(matcher.get_error())}")
    return matcher


def tool_call_matcher(tokenizer, n_vocab: int, tools: list, hermes: bool, name: str | None = None):
    """A fresh matcher for one call to one of `tools` (OpenAI's list), or to the one `name`d, its arguments
    valid for the function's `parameters` schema, in the form the chat template's models write: a Hermes
    `<tool_call>` block, or the Llama 3.1 JSON call. DllamaError naming what is wrong with a schema."""
    import json

    import llguidance

    key = "arguments" if hermes else "parameters"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                key: t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False}
             for t in tools if name is None or t["function"]["name"] == name]
    schema = {"anyOf": calls}
    try:
        if hermes:
            grammar = llguidance.LLMatcher.grammar_from_lark(
                'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema))
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        problem = llguidance.LLMatcher.validate_grammar(grammar)
    except Exception as exc:  # noqa: BLE001 - the Rust side's errors surface as several Python types
        problem = str(exc)
    if problem:
        raise DllamaError(f"tools: a function's parameters are not a usable JSON schema: {_one_line(problem)}")
    return llguidance.LLMatcher(_llg_tokenizer(tokenizer, n_vocab), grammar, log_level=0)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


@numba.njit(cache=True, nogil=True)
def _apply_mask(logits, mask):
    # bit i of the mask (word i >> 5, bit i & 31) says token i may come next
    for i in range(logits.size):
        if not (mask[i >> 5] >> (i & 31)) & 1:
            logits[i] = -np.inf


class GrammarSampler:
    """`inner` sampler restricted to what `matcher` allows; the matcher follows every token chosen."""

    def __init__(self, inner, matcher, n_vocab: int):
        self.inner, self.matcher = inner, matcher
        self._mask = np.zeros((n_vocab + 31) // 32, np.int32)   # filled in place each step

    def wants(self) -> tuple:
        return FULL_LOGITS   # the mask can rule out any token, so the nodes' top candidates would not do

    def __call__(self, logits) -> int:
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if m.is_error():
            raise DllamaError(f"constrained decoding failed: {_one_line(m.get_error())}")
        _apply_mask(logits, self._mask)
        tok = int(self.inner(logits))
        if not m.consume_token(tok):
            raise DllamaError(f"constrained decoding failed: {_one_line(m.get_error())}")
        return tok
