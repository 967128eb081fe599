"""Chat templates against llama.cpp's rendering (the GGUF's own Jinja template), the published Llama 2 / 3
prompt formats, the sandbox, and stop detection over split pieces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.chat import ChatTemplate, StopDetector, detect_builtin
from dllama.errors import DllamaError
from dllama.formats.dlt import TokenizerData, write_t
from dllama.tokenizer import Tokenizer
from test_tokenizer import smollm2_reader


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return Tokenizer.from_gguf(smollm2_reader(smollm2_path))


def test_reference_chats_render_and_tokenize_identically(tok, reference):
    chat = ChatTemplate.for_tokenizer(tok)
    assert chat.builtin is None and chat.source == reference["model"]["chat_template"]
    for c in reference["chats"]:
        assert chat.render(c["messages"]) == c["rendered_prompt"]
        assert chat.prompt_ids(tok, c["messages"]) == c["prompt_ids"]
        # the built-in chatml is the same format (llama.cpp's builtin agreed on this case too)
        assert ChatTemplate(None, builtin="chatml").render(c["messages"]) == c["llama_chat_apply_template_builtin"]


def test_default_system_message_and_content_parts(tok):
    chat = ChatTemplate.for_tokenizer(tok)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    assert chat.render(parts) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                  "Hugging Face<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert chat.render(parts, add_generation_prompt=False).endswith("there<|im_end|>\n")
    with pytest.raises(DllamaError, match="image_url"):
        chat.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(DllamaError, match="message 0: needs a string 'role'"):
        chat.render([{"content": "x"}])


def test_t_file_without_template_gets_the_builtin_of_its_vocabulary(tok, tmp_path):
    data = tok.t_data()
    data.chat_template = None
    write_t(tmp_path / "no_template.t", data)
    t_tok = Tokenizer.from_t(tmp_path / "no_template.t")
    chat = ChatTemplate.for_tokenizer(t_tok)
    assert chat.builtin == "chatml"
    msgs = [{"role": "user", "content": "hi"}]
    assert chat.render(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    llama3 = Tokenizer.from_t_data(TokenizerData(
        [b"<|begin_of_text|>", b"<|eot_id|>", b"<|start_header_id|>", b"<|end_header_id|>", b"x"], [0.0] * 5,
        bos_id=0, eos_ids=[1]))
    assert ChatTemplate.for_tokenizer(llama3).builtin == "llama3"
    llama2 = Tokenizer.from_t_data(TokenizerData([b"<unk>", b"<s>", b"</s>", b"x"], [0.0] * 4, bos_id=1,
                                                 eos_ids=[2]))
    assert ChatTemplate.for_tokenizer(llama2).builtin == "llama2"
    with pytest.raises(DllamaError, match="no chat template"):
        ChatTemplate.for_tokenizer(Tokenizer.from_t_data(TokenizerData([b"a", b"b"], [0.0, 0.0], bos_id=0)))


def test_builtins_follow_the_published_formats():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    # Meta's Llama 3 model card
    assert ChatTemplate(None, "<|begin_of_text|>", "<|eot_id|>", builtin="llama3").render(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # Meta's Llama 2 chat format (llama's generation.py)
    assert ChatTemplate(None, "<s>", "</s>", builtin="llama2").render(msgs) == (
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]")
    assert detect_builtin("... [INST] ...") == "llama2" and detect_builtin("<|im_start|>") == "chatml"
    assert detect_builtin("nothing") is None
    deepseek = ChatTemplate(None, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", builtin="deepSeek3")
    assert deepseek.builtin == "deepseek3" and deepseek.render(msgs) == (
        "<｜begin▁of▁sentence｜>SYS<｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>U2<｜Assistant｜>")
    with pytest.raises(DllamaError, match="unknown chat template 'zephyr'"):
        ChatTemplate(None, builtin="zephyr")


def test_prompt_ids_do_not_double_the_bos():
    vocab = [b"<|begin_of_text|>", b"<|eot_id|>", b"<|start_header_id|>", b"<|end_header_id|>"]
    vocab += [bytes([b]) for b in range(256)]
    t = Tokenizer.from_t_data(TokenizerData(vocab, [0.0] * len(vocab), bos_id=0, eos_ids=[1], add_bos=True))
    chat = ChatTemplate.for_tokenizer(t)
    ids = chat.prompt_ids(t, [{"role": "user", "content": "x"}])
    assert ids[:3] == [0, 2, 4 + ord("u")] and ids.count(0) == 1


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{{ cycler.__init__.__globals__.os.system('true') }}",
])
def test_sandbox_refuses_python_internals(source):
    with pytest.raises(DllamaError, match="chat template failed") as e:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert "unsafe" in str(e.value) or "undefined" in str(e.value)


def test_template_helpers_and_errors():
    chat = ChatTemplate("{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}"
                        "{{ messages[0]|tojson }}|{{ strftime_now('%Y') | length }}")
    assert chat.render([{"role": "user", "content": "é<b>"}]) == '{"role": "user", "content": "é<b>"}|4'
    with pytest.raises(DllamaError, match="only one message"):
        chat.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(DllamaError, match="does not compile"):
        ChatTemplate("{% for %}")


def _run(det, pieces, ids=None):
    out = [det.feed(p, None if ids is None else ids[i]) for i, p in enumerate(pieces)]
    return "".join(out) + det.flush(), out


def test_stop_string_split_over_pieces_never_leaks():
    det = StopDetector(["<|im_end|>", "\n\nUser:"], eos_ids=[2])
    text, out = _run(det, ["Hello", " wor", "ld<|im", "_e", "nd|> tail"])
    assert text == "Hello world" and det.stopped and det.reason == "stop"
    assert all("<|" not in o for o in out) and out[2] == "ld"
    assert det.feed("more") == ""


def test_false_start_is_released_and_eos_stops():
    det = StopDetector(["STOP"], eos_ids=[7])
    assert det.feed("ST") == "" and det.feed("ART ") == "START "
    assert det.feed("ST") == "" and det.feed("<eos>", 7) == "ST"
    assert det.stopped and det.reason == "eos" and det.flush() == ""
    det = StopDetector(["STOP"])
    assert det.feed("end ST") == "end " and det.flush() == "ST" and not det.stopped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "x ", "S", "ST", "STO", "STOP", "<", "<|", "<|>", "aa", "aab"]),
                max_size=12).map("".join),
       st.lists(st.integers(1, 5), max_size=30))
def test_stop_detector_equals_cutting_the_whole_text(text, cuts):
    stops = ["STOP", "<|>", "aab"]
    pieces, i = [], 0
    for c in cuts:
        pieces.append(text[i:i + c])
        i += c
    pieces.append(text[i:])
    det = StopDetector(stops)
    out, emitted = _run(det, pieces)
    first = min((j for j in (text.find(s) for s in stops) if j >= 0), default=len(text))
    assert out == text[:first] and det.stopped == (first < len(text))
    for k in range(len(emitted)):   # nothing emitted early may later turn out to be a stop's start
        assert text.startswith("".join(emitted[:k + 1]))
