"""Distributed Llama `.t` tokenizer files: read and write.

The layout is the one the reference's `src/tokenizer.cpp` reads and `converter/tokenizer-writer.py` writes
(little-endian):

    int32 magic = 0x567124
    int32 header_size                  bytes of magic + header_size + the key/value pairs
    (int32 key, int32 value) * n       keys below
    chat template                      `chat_template` bytes (UTF-8), when that key is present
    chat stop                          `chat_stop` bytes (old files; skipped)
    int32 eos id * n_eos_tokens
    per token: float32 score, uint32 length, `length` bytes (raw bytes, not GPT-2's unicode stand-ins)

The first files (magic 0x567123) carry five int32 instead of the key/value block: vocab size, max token
length, bos id, eos id, pad id.

Which tokens are special (control) is not stored. The reference assumes ids >= bos id; that is wrong for
vocabularies such as SmolLM2's, whose specials sit at ids 0..16 around bos id 1. Files written here mark
special tokens with the score -inf (a score no merge can ever pick, so the reference still reads them
correctly); files from the reference's converters are read with `guess_special_ids`.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field

from dllama.errors import FormatError

MAGIC = 0x567124
OLD_MAGIC = 0x567123
SPECIAL_SCORE = float("-inf")

KEY_VERSION, KEY_VOCAB_SIZE, KEY_MAX_TOKEN_LENGTH, KEY_BOS_ID, KEY_EOS_ID, KEY_PAD_ID = 0, 1, 2, 3, 4, 5
KEY_CHAT_EOS_ID, KEY_CHAT_TEMPLATE, KEY_CHAT_STOP, KEY_N_EOS_TOKENS, KEY_ADD_BOS = 6, 7, 8, 9, 10
_KNOWN_KEYS = range(0, 11)

# `<|im_start|>`, `<s>`, `</s>`, `<unk>`, `<repo_name>`, `<|reserved_special_token_3|>` - but not the
# SentencePiece byte tokens `<0x0A>` (written as raw bytes anyway) and nothing with whitespace inside.
_SPECIAL_LOOKING = re.compile(rb"<[^\s<>]+>\Z")
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>\Z")


@dataclass
class TokenizerData:
    """The contents of a `.t` file."""

    tokens: list                    # list[bytes], the bytes each token stands for
    scores: list                    # list[float], higher merges first
    bos_id: int = -1                # -1: none
    eos_ids: list = field(default_factory=list)
    add_bos: bool = True
    chat_template: str | None = None
    special_ids: frozenset = frozenset()  # control tokens: matched whole in text, never merged into
    pad_id: int | None = None
    version: int = 1

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


def guess_special_ids(tokens, scores, bos_id, eos_ids) -> frozenset:
    """Which tokens of a `.t` file are special.

    Files written by this project say so (score -inf). For the reference's files: bos, the eos ids, and
    the contiguous block of `<...>`-looking tokens around each of them (Llama 3's 256 tokens from 128000,
    SmolLM2's 0..16, Llama 2's `<unk> <s> </s>`).
    """
    marked = {i for i, s in enumerate(scores) if s == SPECIAL_SCORE}
    if marked:
        return frozenset(marked)

    def looks_special(i):
        t = tokens[i]
        return bool(_SPECIAL_LOOKING.match(t)) and not _BYTE_TOKEN.match(t)

    special = set()
    for anchor in [bos_id, *eos_ids]:
        if not 0 <= anchor < len(tokens):
            continue
        special.add(anchor)
        for step in (-1, 1):
            i = anchor + step
            while 0 <= i < len(tokens) and looks_special(i):
                special.add(i)
                i += step
    return frozenset(special)


class _Reader:
    def __init__(self, path, data):
        self.path, self.data, self.pos = path, data, 0

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise FormatError(f"{self.path}: truncated .t file (needs {size} more bytes at offset {self.pos})")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def raw(self, n, what):
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"{self.path}: truncated .t file (reading {what} at offset {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def read_t(path) -> TokenizerData:
    """Read a `.t` file. Raises FormatError (wrong magic, unknown key, old version, truncated)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"cannot read tokenizer {path}: {e.strerror}") from None
    r = _Reader(path, data)
    (magic,) = r.take("<i")
    if magic == OLD_MAGIC:
        vocab_size, max_len, bos_id, eos_id, pad_id = r.take("<IIiii")
        out = TokenizerData([], [], bos_id=bos_id, eos_ids=[eos_id], pad_id=pad_id)
    elif magic == MAGIC:
        out, vocab_size, max_len = _read_header(r)
    else:
        raise FormatError(f"{path}: not a Distributed Llama tokenizer (magic 0x{magic & 0xFFFFFFFF:x})")
    if vocab_size <= 0 or max_len < 1:
        raise FormatError(f"{path}: bad header (vocab size {vocab_size}, max token length {max_len})")
    for _ in range(vocab_size):
        score, length = r.take("<fI")
        out.tokens.append(r.raw(length, "a token"))
        out.scores.append(score)
    for name, i in [("bos id", out.bos_id), *(("eos id", e) for e in out.eos_ids)]:
        if i >= vocab_size or (i < 0 and name != "bos id"):
            raise FormatError(f"{path}: {name} {i} is outside the vocabulary of {vocab_size}")
    out.special_ids = guess_special_ids(out.tokens, out.scores, out.bos_id, out.eos_ids)
    return out


def _read_header(r: _Reader):
    (header_size,) = r.take("<i")
    n_ints = (header_size - 8) // 4
    if header_size < 8 or n_ints % 2:
        raise FormatError(f"{r.path}: bad header size {header_size}")
    kv = r.take(f"<{n_ints}i")
    out = TokenizerData([], [], version=-1)
    vocab_size = max_len = template_len = stop_len = n_eos = 0
    for key, value in zip(kv[0::2], kv[1::2]):
        if key not in _KNOWN_KEYS:
            raise FormatError(f"{r.path}: unknown tokenizer header key {key}")
        if key == KEY_VERSION:
            out.version = value
        elif key == KEY_VOCAB_SIZE:
            vocab_size = value
        elif key == KEY_MAX_TOKEN_LENGTH:
            max_len = value
        elif key == KEY_BOS_ID:
            out.bos_id = value
        elif key in (KEY_EOS_ID, KEY_CHAT_EOS_ID):
            out.eos_ids.append(value)
        elif key == KEY_PAD_ID:
            out.pad_id = value
        elif key == KEY_CHAT_TEMPLATE:
            template_len = value
        elif key == KEY_CHAT_STOP:
            stop_len = value
        elif key == KEY_N_EOS_TOKENS:
            n_eos = value
        elif key == KEY_ADD_BOS:
            out.add_bos = value == 1
    if out.version != 1:
        raise FormatError(f"{r.path}: tokenizer version {out.version} is not supported (expected 1)")
    if template_len > 0:
        out.chat_template = r.raw(template_len, "the chat template").decode("utf-8", errors="replace")
    # The reference reader skips the stop bytes before the template; its writer put them after it.
    r.raw(max(stop_len, 0), "the chat stop string")
    out.eos_ids.extend(r.take(f"<{n_eos}i") if n_eos > 0 else ())
    return out, vocab_size, max_len


def write_t(path, tokenizer) -> None:
    """Write a `.t` file atomically (temporary name, then rename).

    `tokenizer` is a TokenizerData or anything with a `t_data()` method returning one (dllama's Tokenizer).
    """
    data = tokenizer if isinstance(tokenizer, TokenizerData) else tokenizer.t_data()
    if not data.tokens or any(len(t) == 0 for t in data.tokens):
        raise FormatError(f"{path}: cannot write an empty vocabulary or an empty token")
    template = data.chat_template.encode("utf-8") if data.chat_template else b""
    kv = [(KEY_BOS_ID, data.bos_id), (KEY_VERSION, 1), (KEY_VOCAB_SIZE, len(data.tokens)),
          (KEY_MAX_TOKEN_LENGTH, max(len(t) for t in data.tokens))]
    if template:
        kv.append((KEY_CHAT_TEMPLATE, len(template)))
    kv += [(KEY_N_EOS_TOKENS, len(data.eos_ids)), (KEY_ADD_BOS, 1 if data.add_bos else 0)]
    parts = [struct.pack("<ii", MAGIC, 8 + 8 * len(kv))]
    parts += [struct.pack("<ii", k, v) for k, v in kv]
    parts.append(template)
    parts += [struct.pack("<i", e) for e in data.eos_ids]
    special = data.special_ids
    for i, (token, score) in enumerate(zip(data.tokens, data.scores)):
        score = SPECIAL_SCORE if i in special else score
        if math.isnan(score):
            raise FormatError(f"{path}: token {i} has a NaN score")
        parts.append(struct.pack("<fI", score, len(token)))
        parts.append(token)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
