"""The tokenizer against llama.cpp's ids and decodings for SmolLM2 (tests/data), and the pre-tokenizer
scanners against the original regexes run by the `regex` package."""

from __future__ import annotations

import functools
import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testlib import need, need_module
from dllama import tokenizer as T
from dllama.errors import DllamaError
from dllama.tokenizer import StreamDecoder, Tokenizer


@functools.lru_cache(maxsize=None)
def smollm2_reader(path):
    """One parse of the GGUF for all the tokenizer test modules (GGUFReader takes seconds)."""
    import gguf

    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return Tokenizer.from_gguf(smollm2_reader(smollm2_path))


def _cases(reference):
    return {c["text"]: c for c in reference["tokenizer_cases"]}


def test_metadata_matches_llama_cpp(tok, reference):
    model = reference["model"]
    assert tok.kind == "gpt2" and tok.pre == model["tokenizer_pre"] == "smollm"
    assert tok.vocab_size == model["n_vocab"]
    assert tok.bos_id == model["bos_token_id"] and tok.token_text(tok.bos_id) == model["bos_token"]
    assert tok.eos_id == model["eos_token_id"] and tok.token_text(tok.eos_id) == model["eos_token"]
    assert tok.add_bos is model["add_bos_token"]
    assert tok.chat_template == model["chat_template"]
    specials = model["special_tokens"]
    assert {s["id"] for s in specials} <= tok.special_ids
    assert all(tok.token_text(s["id"]) == s["text"] for s in specials)
    assert set(tok.eos_ids) == {s["id"] for s in specials if s["is_eog"]}


def test_every_reference_case_plain_and_special(tok, reference):
    for case in reference["tokenizer_cases"]:
        text = case["text"]
        plain = tok.encode(text, parse_special=False)
        assert plain == case["ids"], text
        assert [tok.token_text(i) for i in plain] == case["vocab_strings"], text
        assert tok.encode(text, add_bos=True, parse_special=False) == [tok.bos_id] + case["ids"]
        assert tok.encode(text) == case["ids_parse_special"], text
        assert tok.decode(plain) == case["decoded"], text
        assert tok.decode(case["ids_parse_special"]) == case["decoded_parse_special_unparse"], text
        assert tok.decode(case["ids_parse_special"], skip_special=True) == \
            case["decoded_parse_special_without_special"], text


def test_reference_prompts_and_generated_text(tok, reference):
    for c in reference["completions"]:
        assert tok.encode(c["prompt"]) == c["prompt_ids"] == c["prompt_ids_no_bos"]
        assert tok.encode(c["prompt"], add_bos=True) == c["prompt_ids_with_bos"]
        assert tok.decode(c["generated_ids"]) == c["generated_text"]
    for c in reference["chats"]:
        assert tok.encode(c["rendered_prompt"]) == c["prompt_ids"]
        assert tok.decode(c["reply_ids"]) == c["reply_text"]


def _stream(tok, ids, skip_special=False):
    dec = StreamDecoder(tok, skip_special)
    pieces = [dec.feed(i) for i in ids]
    return pieces, dec.flush()


def test_stream_decoding_holds_back_partial_characters(tok, reference):
    cases = _cases(reference)
    for text in ["emoji 🙂🚀 family 👨\u200d👩\u200d👧 flag 🇫🇷", "日本語のテキスト 中文 한국어 Русский",
                 "Ω≈ç√∫˜µ≤≥÷ math"]:
        ids = cases[text]["ids"]
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids) == text
        assert tail == "" and not any("\ufffd" in p for p in pieces)
        # the cases really do split characters over tokens: some tokens alone yield nothing
        assert any(p == "" for p in pieces)
    # '🚀' is 3 tokens (ðŁ ļ Ģ): nothing comes out until its last byte
    rocket = tok.encode("🚀", parse_special=False)
    assert len(rocket) > 1
    pieces, _ = _stream(tok, rocket)
    assert pieces[:-1] == [""] * (len(rocket) - 1) and pieces[-1] == "🚀"


def test_stream_decoding_unfinished_character_and_specials(tok, reference):
    ids = tok.encode("🚀", parse_special=False)[:-1]
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) == "" and tail == "\ufffd"
    case = _cases(reference)["text<|im_end|>more text"]
    pieces, tail = _stream(tok, case["ids_parse_special"])
    assert "".join(pieces) == case["decoded_parse_special_unparse"]
    pieces, tail = _stream(tok, case["ids_parse_special"], skip_special=True)
    assert "".join(pieces) == case["decoded_parse_special_without_special"]


def test_special_token_matching_is_longest_first(tok):
    # '<|im_start|>' and '<|im_end|>' inside longer text, adjacent, and a near miss
    ids = tok.encode("<|im_start|><|im_end|><|im_end>")
    assert ids[:2] == [tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")]
    assert tok.decode(ids) == "<|im_start|><|im_end|><|im_end>"
    assert tok.token_id("<|im_end|>") not in ids[2:]


def test_a_long_prompt_round_trips(tok):
    # how long encoding takes is measured by bench/tokenizer.py
    words = ("The quick brown fox, 1234 jumps over 56 lazy dogs; naïve café déjà vu — 日本語 🙂 "
             "def f(x): return x**2  # ok\n\t").split(" ")
    text = " ".join(words[i * 7 % len(words)] + str(i) for i in range(700))
    tok._word_cache.clear()
    ids = tok.encode(text)
    assert len(ids) >= 2000 and tok.decode(ids) == text


def test_unsupported_vocabularies_are_refused():
    with pytest.raises(DllamaError, match="pre-type 'tekken'"):
        Tokenizer("gpt2", ["a"], [T.NORMAL], merges=[], pre="tekken")


# ---- the pre-tokenizer scanners against the regexes they stand for (llama.cpp's comments), run by `regex`

GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")

# letters, marks, digits of several scripts (² and ½ are \p{N} too), unicode spaces, CR/LF, apostrophes
ALPHABET = list("aAzZ'sStTdDmMlLrReEvV 09_-.,!?()*#&\n\r\t") + [
    "é", "ß", "Ω", "ж", "日", "本", "한", "٣", "²", "½", "\u00a0", "\u3000", "\u2009", "\u0085", "\u0301",
    "🙂", "—", "€"]


def _regex_split(pattern, text):
    regex = need_module("regex", "pip install regex")
    out, pos = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _need_regex():
    need(importlib.util.find_spec("regex") is not None,
         "the regex package (outside truth for the pre-tokenizer scanners) is not installed")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_gpt2_scanner_equals_regex(text):
    _need_regex()
    assert T._split_gpt2(text) == _regex_split(GPT2_RE, text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_llama3_and_qwen2_scanners_equal_regex(text):
    _need_regex()
    assert T._split_llama3(text, 3) == _regex_split(LLAMA3_RE, text)
    assert T._split_llama3(text, 1) == _regex_split(QWEN2_RE, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_smollm_pre_split_equals_regex(text):
    _need_regex()
    expected = [w for chunk in _regex_split(r"\p{N}", text) for w in _regex_split(GPT2_RE, chunk)]
    assert [w for chunk in T._pre_numbers_isolated(text) for w in T._split_gpt2(chunk)] == expected


def test_byte_map_is_gpt2s():
    # GPT-2's encoder.py: printable latin-1 stays itself, the other 68 bytes map to U+0100.. in order
    assert T.BYTE_TO_CHAR[ord(" ")] == "Ġ" and T.BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert T.BYTE_TO_CHAR[0] == "\u0100" and T.BYTE_TO_CHAR[0xAD] == "\u0143"
    assert sorted(T.CHAR_TO_BYTE.values()) == list(range(256))


def test_bad_input_is_a_user_error(tok):
    with pytest.raises(DllamaError, match="token id 49152 is outside the vocabulary of 49152"):
        tok.decode([1, 49152])
    with pytest.raises(DllamaError, match="token id -1"):
        tok.decode([-1])
    # a lone surrogate (possible in JSON) is encoded as U+FFFD, not a crash
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
