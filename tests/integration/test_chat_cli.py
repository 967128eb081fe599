"""`dllama chat` driven through its stdin as a user would pipe it, and through a terminal (a pty) as a
user would type: Ctrl-C in the middle of a reply, another message, Ctrl-D."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

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


PROMPT_MARK = "👱 User\n> ".encode()
SPEED = re.compile(r"\x1b\[2m(\d+) tokens, ([\d.]+) tok/s, first token (\d+) ms( \(stopped\))?\x1b\[0m\n")


class Terminal:
    """A process on a pseudo-terminal, its output exactly as written (no echo, no CR-LF translation)."""

    def __init__(self, argv):
        import termios

        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.out = b""

    def wait_for(self, done, timeout=240.0) -> bytes:
        """Read until done(output so far) holds; fail (with the output) if it does not within `timeout`."""
        deadline = time.monotonic() + timeout
        while not done(self.out):
            if time.monotonic() > deadline or self.proc.poll() is not None and not self._read(0):
                pytest.fail(f"terminal output so far:\n{self.out.decode(errors='replace')}")
            self._read(0.5)
        return self.out

    def _read(self, timeout) -> bool:
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.master, 1 << 16)
        except OSError:   # the other side is closed
            return False
        self.out += chunk
        return bool(chunk)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.master)


MAX_TOKENS = 96


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(smollm2_path):
    system, first, second = "You are a storyteller.", "Tell me a very long story about a dragon.", "What was its name?"
    term = Terminal([sys.executable, "-m", "dllama", "chat", "--model", smollm2_path, "--temperature", "0",
                     "--system", system, "--max-seq-len", "1024", "--max-tokens", str(MAX_TOKENS), "--nthreads", "2"])
    try:
        term.wait_for(lambda out: out.endswith(PROMPT_MARK))
        term.type(first.encode() + b"\n")
        start = len(term.out)
        term.wait_for(lambda out: len(out) - start > 80)   # the reply is streaming, far from MAX_TOKENS
        term.proc.send_signal(signal.SIGINT)
        term.wait_for(lambda out: out.count(PROMPT_MARK) == 2)   # back at the prompt, still running
        term.type(second.encode() + b"\n")
        term.wait_for(lambda out: out.count(PROMPT_MARK) == 3)
        term.type(b"\x04")   # Ctrl-D
        assert term.proc.wait(60) == 0
    finally:
        term.close()
    text = term.out.decode()
    assert "Traceback" not in text
    replies = re.findall(r"🤖 Assistant\n(.*?)\n" + SPEED.pattern, text, re.S)
    assert len(replies) == 2, text
    (partial, *speed1), (answer, *speed2) = replies
    assert speed1[3] and not speed2[3], text   # the first was stopped, the second ran to its end
    assert int(speed1[0]) >= 1 and float(speed1[1]) > 0 and int(speed2[0]) >= 1, text
    # the stopped reply stayed in the conversation as far as it got: the second answer is the greedy
    # continuation of exactly that history
    from dllama.engine import Engine
    from dllama.sampler import Sampler

    eng = Engine.open(smollm2_path, max_seq_len=1024)
    try:
        history = [{"role": "system", "content": system}, {"role": "user", "content": first},
                   {"role": "assistant", "content": partial}, {"role": "user", "content": second}]
        ids = eng.chat.prompt_ids(eng.tokenizer, history)
        out = []
        for t in eng.generate(ids, MAX_TOKENS, Sampler(temperature=0)):
            if t in eng.tokenizer.eos_ids:
                break
            out.append(t)
        assert answer == eng.tokenizer.decode(out)
    finally:
        eng.close()
