"""`dllama chat` driven through its stdin as a user would pipe it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_chat_turns_follow_the_template_and_end_on_eof(smollm2_path, reference):
    case = reference["chats"][0]
    system = case["messages"][0]["content"]
    user_turns = [m["content"] for m in case["messages"] if m["role"] == "user"]
    res = subprocess.run(
        [sys.executable, "-m", "dllama", "chat", "--model", smollm2_path, "--temperature", "0",
         "--system", system, "--max-seq-len", "512", "--max-tokens", "24", "--nthreads", "2"],
        input="\n".join(user_turns[:1]) + "\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "<|im_end|>" not in res.stdout
    # the reply is the greedy continuation of the template-rendered conversation, cut at end-of-turn
    from dllama.engine import Engine
    from dllama.sampler import Sampler

    eng = Engine.open(smollm2_path, max_seq_len=512)
    try:
        ids = eng.chat.prompt_ids(eng.tokenizer, [{"role": "system", "content": system},
                                                  {"role": "user", "content": user_turns[0]}])
        out = []
        for t in eng.generate(ids, 24, Sampler(temperature=0)):
            if t in eng.tokenizer.eos_ids:
                break
            out.append(t)
        expected = eng.tokenizer.decode(out)
    finally:
        eng.close()
    assert res.stdout.strip() == expected.strip()


def test_chat_says_when_the_context_is_full(smollm2_path):
    res = subprocess.run(
        [sys.executable, "-m", "dllama", "chat", "--model", smollm2_path, "--temperature", "0",
         "--max-seq-len", "64", "--max-tokens", "8"],
        input="word " * 80 + "\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "does not fit the context" in res.stderr
