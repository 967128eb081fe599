"""BPE tokenizers: GGUF `gpt2` (byte-level, merges by rank), GGUF `llama` (SentencePiece, merges by score,
byte fallback) and the reference's `.t` files (merges by score over raw bytes, no pre-split).

The GGUF paths follow llama.cpp's `llama-vocab.cpp` / `unicode.cpp`, which is what the reference ids in
`tests/data/` come from: special tokens are cut out of the text first (longest first), the rest is
pre-split by the regex of `tokenizer.ggml.pre` (written here as small scanners over unicode categories, so
that the stdlib is enough), then each piece is merged.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import os
import unicodedata
from dataclasses import dataclass

from dllama.errors import DllamaError
from dllama.formats import dlt

# GGUF token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts llama.cpp treats as end of generation whatever the metadata says (llama-vocab.cpp).
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
    "<｜end▁of▁sentence｜>",
])
# Fill-in-the-middle pad/repo/file-separator tokens: llama.cpp also ends generation on them.
FIM_EOG_TEXTS = frozenset(["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>",
                           "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"])


def _bytes_to_unicode() -> dict:
    """GPT-2's map from each byte to a printable character (vocab strings are written in these)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_BYTE_ENCODE = [BYTE_TO_CHAR[b] for b in range(256)]

# ---- code point classes, as llama.cpp's flags: \p{L}, \p{N}, White_Space, and \p{P} for `default`
LETTER, NUMBER, SPACE, PUNCT, OTHER = 1, 2, 4, 8, 16
_WHITE_SPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                          0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
_CLASS: dict = {}


def _char_class(c: str) -> int:
    k = _CLASS.get(c)
    if k is None:
        cat = unicodedata.category(c)
        if ord(c) in _WHITE_SPACE:
            k = SPACE
        elif cat[0] == "L":
            k = LETTER
        elif cat[0] == "N":
            k = NUMBER
        elif cat[0] == "P":
            k = PUNCT | OTHER
        else:
            k = OTHER
        _CLASS[c] = k
    return k


def _split_gpt2(s: str) -> list:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    cls = [_char_class(c) for c in s] + [0]   # 0: past the end
    n, out, pos = len(s), [], 0
    while pos < n:
        c = s[pos]
        if c == "'" and pos + 1 < n:
            if s[pos + 1] in "stmd":
                out.append(s[pos:pos + 2])
                pos += 2
                continue
            if s[pos + 1:pos + 3] in ("re", "ve", "ll"):
                out.append(s[pos:pos + 3])
                pos += 3
                continue
        start = pos
        k = cls[pos + 1] if c == " " else cls[pos]
        if k & (LETTER | NUMBER) or k & OTHER:
            pos += c == " "
            want = k & (LETTER | NUMBER | OTHER)
            while cls[pos] & want:
                pos += 1
        else:
            end = pos
            while cls[end] == SPACE:
                end += 1
            pos = end - 1 if end - pos > 1 and end < n else end   # leave one space for the next word
        out.append(s[start:pos])
    return out


def _split_llama3(s: str, max_digits: int) -> list:
    """(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|
    \\s*[\\r\\n]+|\\s+(?!\\S)|\\s+   (Qwen2: \\p{N} instead of \\p{N}{1,3})"""
    cls = [_char_class(c) for c in s] + [0]
    n, out, pos = len(s), [], 0
    while pos < n:
        c, k, start = s[pos], cls[pos], pos
        if c == "'" and pos + 1 < n:
            if s[pos + 1].lower() in "stmd":
                out.append(s[pos:pos + 2])
                pos += 2
                continue
            if s[pos + 1:pos + 3].lower() in ("re", "ve", "ll"):
                out.append(s[pos:pos + 3])
                pos += 3
                continue
        if c not in "\r\n" and not k & NUMBER and (k & LETTER or cls[pos + 1] & LETTER):
            pos += 1
            while cls[pos] & LETTER:
                pos += 1
        elif k & NUMBER:
            while cls[pos] & NUMBER and pos - start < max_digits:
                pos += 1
        elif (cls[pos + 1] if c == " " else k) & OTHER:
            pos += c == " "
            while cls[pos] & OTHER:
                pos += 1
            while pos < n and s[pos] in "\r\n":
                pos += 1
        else:
            end, last_newline = pos, -1
            while cls[end] == SPACE:
                if s[end] in "\r\n":
                    last_newline = end + 1
                end += 1
            if last_newline > 0:
                pos = last_newline
            else:
                pos = end - 1 if end - pos > 1 and end < n else end
        out.append(s[start:pos])
    return out


def _split_runs(s: str, match, max_len: int = 0) -> list:
    """Cut out runs of characters where `match(c)`, in pieces of at most `max_len` (0: whole runs); with
    max_len, a leftover shorter than max_len stays unmatched, as a regex like [0-9][0-9][0-9] leaves it."""
    out, i, n = [], 0, len(s)
    while i < n:
        j = i
        while j < n and match(s[j]):
            j += 1
        if j == i:
            while j < n and not match(s[j]):
                j += 1
            out.append(s[i:j])
        elif max_len:
            while j - i >= max_len:
                out.append(s[i:i + max_len])
                i += max_len
            if i < j:
                out.append(s[i:j])
        else:
            out.append(s[i:j])
        i = j
    return out


def _pre_numbers_isolated(s):
    return _split_runs(s, lambda c: _char_class(c) & NUMBER, 1)


def _pre_default_punct(s):
    return _split_runs(s, lambda c: _char_class(c) & PUNCT or c in "$+<=>^~|")


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one `tokenizer.ggml.pre` value."""

    splitters: tuple                # applied in turn, each to every piece the previous one left
    ignore_merges: bool = False     # a piece that is itself a token is taken whole (Llama 3)
    clean_spaces: bool = True       # decode drops the space before . , ? ! and 's 'm 're 've
    add_bos: bool = False           # when the GGUF does not say


_GPT2 = (_split_gpt2,)
_SMOLLM = (_pre_numbers_isolated, _split_gpt2)
_LLAMA3 = (functools.partial(_split_llama3, max_digits=3),)
_QWEN2 = (functools.partial(_split_llama3, max_digits=1),)
_DEFAULT = (_pre_default_punct, _split_gpt2, functools.partial(_split_runs, match=lambda c: _char_class(c) & NUMBER),
            functools.partial(_split_runs, match=lambda c: c in "0123456789", max_len=3))
PRE_TOKENIZERS = {
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"], PreTokenizer(_GPT2)),
    **dict.fromkeys(["starcoder", "refact", "codeshell", "exaone", "minerva-7b"], PreTokenizer(_SMOLLM)),
    **dict.fromkeys(["smollm", "command-r"], PreTokenizer(_SMOLLM, clean_spaces=False)),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3"], PreTokenizer(_LLAMA3, True, True, True)),
    **dict.fromkeys(["dbrx", "smaug-bpe"], PreTokenizer(_LLAMA3)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], PreTokenizer(_QWEN2, clean_spaces=False)),
    "default": PreTokenizer(_DEFAULT),
}


def _merge(symbols: list, priority) -> list:
    """Merge neighbours best-first until no pair qualifies; `priority(a, b)` is None or a number (lower
    merges first); ties go to the leftmost pair (llama.cpp's bigram queue, the reference's scan)."""
    n = len(symbols)
    if n < 2:
        return symbols
    syms, nxt, prv = list(symbols), list(range(1, n + 1)), list(range(-1, n - 1))
    nxt[-1] = -1
    heap = []

    def push(left, right):
        if left >= 0 and right >= 0:
            p = priority(syms[left], syms[right])
            if p is not None:
                heapq.heappush(heap, (p, left, right, len(syms[left]) + len(syms[right])))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        if a is None or b is None or nxt[left] != right or len(a) + len(b) != size:
            continue   # stale: one side was merged since
        syms[left], syms[right] = a + b, None
        nxt[left] = nxt[right]
        if nxt[left] >= 0:
            prv[nxt[left]] = left
        push(prv[left], left)
        push(left, nxt[left])
    return [s for s in syms if s is not None]


class Tokenizer:
    """Text <-> token ids. Build with `from_gguf` or `from_t`.

    kind: "gpt2" (byte-level BPE), "llama" (SentencePiece) or "t" (reference `.t` file).
    """

    def __init__(self, kind, tokens, types, scores=None, merges=None, bos_id=None, eos_id=None,
                 eos_ids=(), add_bos=False, add_space_prefix=False, pre="default", chat_template=None,
                 name=""):
        self.kind, self.name = kind, name
        self.vocab_size = len(tokens)
        self._tokens = tokens            # str (GGUF) or bytes (.t)
        self._types = list(types)
        self._scores = list(scores) if scores is not None else [0.0] * len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_space_prefix = add_bos, add_space_prefix
        self.chat_template = chat_template or None
        self.pre = pre
        self._ids = {}
        for i, t in enumerate(tokens):   # later ids win: a .t file from SentencePiece has byte tokens twice
            self._ids[t] = i
        if kind == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise DllamaError(f"tokenizer pre-type {pre!r} is not supported "
                                  f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
            pre_tokenizer = PRE_TOKENIZERS[pre]
            self._splitters, self._ignore_merges = pre_tokenizer.splitters, pre_tokenizer.ignore_merges
            self.clean_spaces = pre_tokenizer.clean_spaces
            self._ranks = {}
            for rank, m in enumerate(merges or ()):
                a, _, b = m.partition(" ") if not m.startswith(" ") else (" ", "", m[2:])
                self._ranks.setdefault((a, b), rank)
        else:
            self.clean_spaces = False
        self.special_ids = frozenset(i for i, t in enumerate(self._types) if t in (CONTROL, USER_DEFINED, UNKNOWN))
        self._specials = sorted(self.special_ids, key=lambda i: -len(tokens[i]))
        # what skip_special drops: control and unknown tokens (user-defined ones are text, as in llama.cpp)
        self.control_ids = frozenset(i for i in self.special_ids if self._types[i] != USER_DEFINED)
        self.eos_ids = tuple(sorted(set(eos_ids) | ({eos_id} if eos_id is not None else set())))
        self._word_cache: dict = {}
        self._pieces = [self._piece(i) for i in range(len(tokens))]

    # ---- construction
    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Read the vocabulary of a GGUF file (a path, or the `GGUFFile` the model loader already parsed). Raises DllamaError."""
        from dllama.formats.gguf_reader import GGUFFile

        reader = GGUFFile(os.fspath(path_or_reader)) \
            if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader

        def get(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        model = get("tokenizer.ggml.model")
        tokens = get("tokenizer.ggml.tokens")
        if model not in ("gpt2", "llama") or not tokens:
            raise DllamaError(f"GGUF tokenizer {model!r} is not supported (gpt2 and llama are)")
        types = list(get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        spm = model == "llama"
        pre = get("tokenizer.ggml.pre") or "default"
        add_bos_default = True if spm else pre in PRE_TOKENIZERS and PRE_TOKENIZERS[pre].add_bos
        eog = set()
        for i, t in enumerate(tokens):
            if t in EOG_TEXTS or t in FIM_EOG_TEXTS:
                eog.add(i)
                types[i] = CONTROL   # llama.cpp adds the control attribute to these whatever the file says
        for key in ("eot", "eom", "fim_pad", "fim_rep", "fim_sep"):
            if (i := get(f"tokenizer.ggml.{key}_token_id")) is not None and i < len(tokens):
                eog.add(int(i))
        bos = get("tokenizer.ggml.bos_token_id", 1 if spm else None)
        eos = get("tokenizer.ggml.eos_token_id", 2 if spm else None)
        return cls("llama" if spm else "gpt2", tokens, types, scores=get("tokenizer.ggml.scores"),
                   merges=get("tokenizer.ggml.merges") if not spm else None,
                   bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos),
                   eos_ids=eog, add_bos=bool(get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", spm)), pre=pre,
                   chat_template=get("tokenizer.chat_template"), name=get("general.name", ""))

    @classmethod
    def from_t(cls, path) -> "Tokenizer":
        """Read a reference `.t` file. Raises FormatError."""
        data = dlt.read_t(path)
        return cls.from_t_data(data, name=os.path.basename(os.fspath(path)))

    @classmethod
    def from_t_data(cls, data: "dlt.TokenizerData", name="") -> "Tokenizer":
        special = data.special_ids or dlt.guess_special_ids(data.tokens, data.scores, data.bos_id, data.eos_ids)
        types = [CONTROL if i in special else NORMAL for i in range(len(data.tokens))]
        bos = data.bos_id if data.bos_id >= 0 else None
        # end-of-generation by text too, as for GGUF (the reference's converters store one or two eos ids)
        eog = {i for i in special if data.tokens[i].decode("utf-8", "replace") in EOG_TEXTS | FIM_EOG_TEXTS}
        return cls("t", list(data.tokens), types, scores=data.scores, bos_id=bos,
                   eos_id=data.eos_ids[0] if data.eos_ids else None, eos_ids=set(data.eos_ids) | eog,
                   add_bos=data.add_bos and bos is not None, chat_template=data.chat_template, name=name)

    def t_data(self) -> "dlt.TokenizerData":
        """This vocabulary as a `.t` file holds it: bytes per token, and scores that make the reference's
        merge-best-score loop follow the merges: -(rank + 1) of the merge producing each gpt2 token."""
        if self.kind == "gpt2":
            scores = [0.0] * self.vocab_size
            for (a, b), rank in self._ranks.items():
                i = self._ids.get(a + b)
                if i is not None and scores[i] == 0.0:
                    scores[i] = -float(rank + 1)
        else:
            scores = list(self._scores)
        tokens = [self._token_bytes(i) for i in range(self.vocab_size)]
        return dlt.TokenizerData(tokens, scores, bos_id=-1 if self.bos_id is None else self.bos_id,
                                 eos_ids=list(self.eos_ids), add_bos=self.add_bos,
                                 chat_template=self.chat_template, special_ids=self.special_ids)

    # ---- vocabulary
    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (GPT-2 stand-ins, `▁`, or a `.t` file's bytes)."""
        t = self._tokens[token_id]
        return t.decode("utf-8", errors="backslashreplace") if isinstance(t, bytes) else t

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token contributes to decoded text (special tokens: their text)."""
        return self._pieces[token_id]

    def token_id(self, text: str):
        """The id of the token spelled `text` in the vocabulary, or None."""
        return self._ids.get(text.encode("utf-8") if self.kind == "t" else text)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def _token_bytes(self, i) -> bytes:
        t, ty = self._tokens[i], self._types[i]
        if isinstance(t, bytes):
            return t
        if ty in (CONTROL, USER_DEFINED, UNKNOWN):
            return t.encode("utf-8")
        if ty == BYTE and t.startswith("<0x") and len(t) == 6:
            return bytes([int(t[3:5], 16)])
        if self.kind == "llama":
            return t.replace("▁", " ").encode("utf-8")
        if all(c in CHAR_TO_BYTE for c in t):
            return bytes(CHAR_TO_BYTE[c] for c in t)
        return t.encode("utf-8")

    def _piece(self, i) -> bytes:
        return b"" if self._types[i] == UNUSED else self._token_bytes(i)

    # ---- encoding
    def encode(self, text: str, add_bos=None, parse_special=True) -> list:
        """Token ids of `text`. add_bos None: the model's default. parse_special: special-token text
        (`<|im_end|>`) becomes that token; user-defined tokens are matched either way (as llama.cpp)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:   # lone surrogates (from JSON): U+FFFD, as llama.cpp does invalid UTF-8
            text = "".join("\ufffd" if 0xD800 <= ord(c) < 0xE000 else c for c in text)
        out = [self.bos_id] if add_bos and self.bos_id is not None else []
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.kind == "gpt2":
                for chunk in self._pre_split(frag):
                    out.extend(self._bpe_word(chunk))
            elif self.kind == "llama":
                prefix = " " if self.add_space_prefix and prev_special else ""
                out.extend(self._spm(prefix + frag))
            else:
                out.extend(self._t_encode(frag))
            prev_special = False
        return out

    def _partition(self, text, parse_special) -> list:
        """Cut special tokens out of the text, longest first (llama.cpp's tokenizer_st_partition)."""
        frags = [text] if text else []
        for sid in self._specials:
            if not parse_special and self._types[sid] != USER_DEFINED:
                continue
            st = self.token_text(sid)
            if not any(isinstance(f, str) and st in f for f in frags):
                continue
            new = []
            for f in frags:
                if isinstance(f, int) or st not in f:
                    new.append(f)
                    continue
                for j, part in enumerate(f.split(st)):
                    if j:
                        new.append(sid)
                    if part:
                        new.append(part)
            frags = new
        return frags

    def _pre_split(self, text) -> list:
        chunks = [text]
        for split in self._splitters:
            chunks = [piece for chunk in chunks for piece in split(chunk)]
        return chunks

    def _bpe_word(self, chunk: str) -> list:
        ids = self._word_cache.get(chunk)
        if ids is not None:
            return ids
        word = "".join(_BYTE_ENCODE[b] for b in chunk.encode("utf-8"))
        if self._ignore_merges and word in self._ids:
            ids = [self._ids[word]]
        else:
            ranks = self._ranks
            ids = []
            for sym in _merge(list(word), lambda a, b: ranks.get((a, b))):
                i = self._ids.get(sym)
                ids.extend([i] if i is not None else [self._ids[c] for c in sym if c in self._ids])
        if len(self._word_cache) < 100_000:
            self._word_cache[chunk] = ids
        return ids

    def _spm(self, text: str) -> list:
        ids, scores, vocab = [], self._scores, self._ids

        def priority(a, b):
            i = vocab.get(a + b)
            return None if i is None else -scores[i]

        for sym in _merge(list(text.replace(" ", "▁")), priority):
            i = vocab.get(sym)
            if i is not None:
                ids.append(i)
            else:   # byte fallback
                for b in sym.encode("utf-8"):
                    i = vocab.get(f"<0x{b:02X}>")
                    if i is None:
                        raise DllamaError(f"cannot encode {sym!r}: no byte token <0x{b:02X}> in the vocabulary")
                    ids.append(i)
        return ids

    def _t_encode(self, text: str) -> list:
        """The reference's `.t` encoder: bytes gathered until they spell a (non-special) token, then the
        best-scoring neighbour pair that spells a token is merged, again and again (ties: leftmost)."""
        vocab, scores, special = self._ids, self._scores, self.special_ids
        symbols, buf = [], b""
        for b in text.encode("utf-8"):
            buf += bytes([b])
            i = vocab.get(buf)
            if i is not None and i not in special:
                symbols.append(buf)
                buf = b""
        if buf:
            raise DllamaError(f"cannot encode {buf!r} with tokenizer {self.name}: no such token")

        def priority(a, b):
            i = vocab.get(a + b)
            return None if i is None or i in special else -scores[i]

        return [vocab[s] for s in _merge(symbols, priority)]

    # ---- decoding
    def decode(self, ids, skip_special=False) -> str:
        """Text of `ids` (llama_detokenize: special tokens print their text unless skip_special)."""
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise DllamaError(f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        strip_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids, strip_space = ids[1:], False
        out = []
        for n, i in enumerate(ids):
            piece = b"" if skip_special and i in self.control_ids else self._pieces[i]
            if n == 0 and strip_space and piece.startswith(b" "):
                piece = piece[1:]
            out.append(piece)
        data = b"".join(out)
        return _clean_spaces(data).decode("utf-8", errors="replace") if self.clean_spaces else \
            data.decode("utf-8", errors="replace")

    def stream(self, skip_special=False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces: ' ?' ' !' ' .' ' ,' lose the space, ' ' ' becomes ''',
    and " 's" " 'm" " 're" " 've" lose the space."""
    for p in (b"?", b"!", b".", b","):
        data = data.replace(b" " + p, p)
    data = data.replace(b" ' ", b"'")
    for c in (b"'s", b"'m", b"'re", b"'ve"):
        data = data.replace(b" " + c, c)
    return data


class StreamDecoder:
    """Feed ids one by one; each call returns only complete UTF-8 text, holding back a partial character
    (a multi-byte character may be split over several byte tokens). Invalid bytes become U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, skip_special=False):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tokenizer.control_ids:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        return self._utf8.decode(b"", final=True)
