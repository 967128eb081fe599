"""Chat templates (Jinja2 in a sandbox, as Hugging Face and llama.cpp render them) and stop detection."""

from __future__ import annotations

import json
from datetime import datetime

from dllama.errors import DllamaError

# Built-ins for `.t` files that carry no template (the reference's `--chat-template` values).
BUILTIN_TEMPLATES = {
    # Meta's Llama 2 chat format: the system prompt sits inside the first [INST].
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    # The template of Meta's Llama 3 tokenizer_config.json.
    "llama3": (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "deepseek3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
    ),
}

# The reference's `--chat-template` spellings.
BUILTIN_ALIASES = {"deepSeek3": "deepseek3"}

# Marker text -> built-in, in the order the reference checks a template (and here also a vocabulary).
_MARKERS = [("[INST]", "llama2"), ("<|start_header_id|>", "llama3"), ("<｜Assistant｜>", "deepseek3"),
            ("<|im_start|>", "chatml")]


def detect_builtin(text: str | None = None, has_token=None) -> str | None:
    """The built-in matching a template's text, or a vocabulary (`has_token(text) -> bool`)."""
    for marker, name in _MARKERS:
        if text is not None and marker in text:
            return name
        if has_token is not None and marker != "[INST]" and has_token(marker):
            return name
    return None


def _raise_exception(message):
    raise DllamaError(f"chat template: {message}")


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's version: no HTML escaping, unicode kept (Jinja's own escapes < > & ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    return env


def _text_of(content, i) -> str:
    """A message's content as one string: OpenAI content parts [{"type": "text", "text": ...}] are joined
    with newlines; other part types are refused (this is a text model)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DllamaError(f"message {i}: content part of type {kind!r} is not supported (only text)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise DllamaError(f"message {i}: content must be a string or a list of text parts")


class ChatTemplate:
    """Renders a list of messages into the prompt text the model was trained on.

    `template` is Jinja source (a GGUF's `tokenizer.chat_template`); `builtin` ("llama2", "llama3",
    "chatml", "deepseek3") overrides it, as the reference's `--chat-template` flag does.
    """

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = "", builtin=None):
        if builtin is not None:
            builtin = BUILTIN_ALIASES.get(builtin, builtin)
            if builtin not in BUILTIN_TEMPLATES:
                raise DllamaError(f"unknown chat template {builtin!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})")
            template = BUILTIN_TEMPLATES[builtin]
        if not template:
            raise DllamaError("the tokenizer has no chat template; pass one of the built-ins "
                              f"({', '.join(BUILTIN_TEMPLATES)})")
        self.source, self.builtin = template, builtin
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        from jinja2 import TemplateError

        try:
            self._template = _environment().from_string(template)
        except TemplateError as e:
            raise DllamaError(f"chat template does not compile: {e}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer, builtin=None) -> "ChatTemplate":
        """The tokenizer's own template, else the built-in its vocabulary points to. Raises DllamaError."""
        def text(i):
            return tokenizer.token_text(i) if i is not None else ""

        template = tokenizer.chat_template
        if builtin is None and not template:
            builtin = detect_builtin(has_token=lambda t: tokenizer.token_id(t) is not None)
            if builtin is None:
                builtin = "llama2" if text(tokenizer.bos_id) == "<s>" else None
        return cls(template, text(tokenizer.bos_id), text(tokenizer.eos_id), builtin=builtin)

    def render(self, messages, add_generation_prompt=True, **extra) -> str:
        """The prompt text. messages: [{"role": ..., "content": str | [{"type": "text", "text": ...}]}].
        Raises DllamaError on malformed messages or a template error (including sandbox refusals)."""
        from jinja2 import TemplateError

        if not isinstance(messages, (list, tuple)):
            raise DllamaError("messages must be a list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise DllamaError(f"message {i}: needs a string 'role'")
            clean.append({**m, "content": _text_of(m.get("content"), i)})
        try:
            return self._template.render(messages=clean, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as e:
            raise DllamaError(f"chat template failed: {e}") from None

    @property
    def supports_tools(self) -> bool:
        """Whether the template reads a `tools` variable (Hugging Face's name for the function list)."""
        from jinja2 import meta

        return "tools" in meta.find_undeclared_variables(_environment().parse(self.source))

    def prompt_ids(self, tokenizer, messages, add_generation_prompt=True, **extra) -> list:
        """Render and tokenize (special-token text parsed); no second BOS when the template wrote one.
        `extra`: more template variables (`tools`)."""
        text = self.render(messages, add_generation_prompt, **extra)
        add_bos = tokenizer.add_bos and not (self.bos_token and text.startswith(self.bos_token))
        return tokenizer.encode(text, add_bos=add_bos, parse_special=True)


class StopDetector:
    """Cuts generated text at the first stop string or end-of-generation token.

    feed() takes each decoded piece and returns the text safe to show now; a suffix that could still
    become a stop string is held back, so a stop string split over several tokens never leaks.
    """

    def __init__(self, stop_strings=(), eos_ids=()):
        self.stops = [s for s in (stop_strings or ()) if s]
        self.eos_ids = frozenset(eos_ids or ())
        self._held = ""
        self.stopped = False
        self.reason = None          # "eos" or "stop" once stopped

    def feed(self, text: str, token_id: int | None = None) -> str:
        if self.stopped:
            return ""
        if token_id is not None and token_id in self.eos_ids:
            self.stopped, self.reason = True, "eos"
            out, self._held = self._held, ""
            return out
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.reason, self._held = True, "stop", ""
            return buf[:cut]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation without a stop: the held-back text is not a stop after all."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
