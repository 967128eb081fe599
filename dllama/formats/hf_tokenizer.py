"""A Hugging Face `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) as a dllama Tokenizer.

Byte-level BPE vocabularies (GPT-2 style: Llama 3, Qwen, SmolLM) become the GGUF `gpt2` kind with their
merges; SentencePiece-derived BPE (`byte_fallback`, `▁` for spaces: Llama 2, Mistral) the `llama` kind,
each token scored by the rank of the merge that makes it. Token types follow llama.cpp's
`get_vocab_base`: added special tokens are control, other added tokens user-defined, ids the vocabulary
lacks up to the model's size `[PAD<id>]` (unused). The pre-tokenizer is named by the regex it splits with.
"""

from __future__ import annotations

import os

from dllama.errors import DllamaError
from dllama.formats.hf import _read_json
from dllama.tokenizer import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, Tokenizer

# the Split regex of a byte-level pre-tokenizer -> tokenizer.ggml.pre (dllama.tokenizer.PRE_TOKENIZERS)
_QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_BY_REGEX = {_QWEN2_RE: "qwen2", _LLAMA3_RE: "llama-bpe", _GPT2_RE: "gpt-2"}


def _pre_name(pre: dict | None) -> str:
    """`tokenizer.ggml.pre` for a byte-level pre_tokenizer: by its Split regex; single digits then GPT-2's
    regex (ByteLevel's own) is SmolLM's; ByteLevel alone is GPT-2's. Anything else: llama.cpp's default."""
    regexes, digits = [], False
    stack = [pre] if pre else []
    while stack:
        p = stack.pop()
        stack.extend(reversed(p.get("pretokenizers") or []))
        if p.get("type") == "Split":
            regexes.append((p.get("pattern") or {}).get("Regex"))
        elif p.get("type") == "Digits":
            digits = digits or bool(p.get("individual_digits"))
        elif p.get("type") == "ByteLevel" and p.get("use_regex", True):
            regexes.append(_GPT2_RE)
    names = [_PRE_BY_REGEX.get(r, "default") for r in regexes]
    if digits:
        return "smollm" if names == ["gpt-2"] else "default"
    return names[0] if len(names) == 1 else "default"


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: str, tcfg: dict) -> str | None:
    jinja = os.path.join(folder, "chat_template.jinja")   # where transformers >= 4.49 saves it
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    t = tcfg.get("chat_template")
    if isinstance(t, list):   # named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]


def read_tokenizer(folder: str, vocab_size: int, config: dict) -> Tokenizer:
    """The tokenizer of a checkpoint folder, padded to the model's `vocab_size`. Raises DllamaError."""
    return Tokenizer(**read_vocab(folder, vocab_size, config))


def read_vocab(folder: str, vocab_size: int, config: dict) -> dict:
    """The arguments of `Tokenizer(...)` for a checkpoint folder (what a GGUF's tokenizer keys hold)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise DllamaError(f"--hf {folder}: no tokenizer.json (a tokenizer.model-only checkpoint is not supported)")
    tj = _read_json(path, "tokenizer.json")
    tc_path = os.path.join(folder, "tokenizer_config.json")
    tcfg = _read_json(tc_path, "tokenizer_config.json") if os.path.isfile(tc_path) else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise DllamaError(f"{path}: tokenizer model {model.get('type')!r} is not supported (BPE)")
    spm = bool(model.get("byte_fallback"))
    vocab = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens") or ()}
    for text, t in added.items():
        vocab[text] = t["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens: list = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        elif text in added:
            types.append(CONTROL if added[text].get("special") else USER_DEFINED)
        elif spm and text.startswith("<0x") and len(text) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
    merges = _merges(model)
    ids = {t: i for i, t in enumerate(tokens)}
    bos = ids.get(_token_text(tcfg.get("bos_token")), config.get("bos_token_id"))
    eos = ids.get(_token_text(tcfg.get("eos_token")))
    eos_ids = config.get("eos_token_id")
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [] if eos_ids is None else [eos_ids])
    if eos is None and eos_ids:
        eos = min(eos_ids)
    add_bos = tcfg.get("add_bos_token", spm)
    common = dict(bos_id=bos, eos_id=eos, eos_ids=eos_ids, add_bos=bool(add_bos and bos is not None),
                  chat_template=_chat_template(folder, tcfg), name=os.path.basename(os.path.normpath(folder)))
    if spm:
        scores = [0.0] * n
        for rank, m in enumerate(merges):
            i = ids.get(m.replace(" ", "", 1))
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(rank + 1)
        return dict(kind="llama", tokens=tokens, types=types, scores=scores, add_space_prefix=True, **common)
    return dict(kind="gpt2", tokens=tokens, types=types, merges=merges, pre=_pre_name(tj.get("pre_tokenizer")),
                **common)
