"""`dllama chat`: a terminal chat with the model's own chat template, streaming replies.

Ctrl-C while a reply streams stops that reply, as in llama-cli and Ollama: what it said so far stays in
the conversation, and the prompt comes back. Ctrl-C at the prompt, or Ctrl-D, ends the chat. After each
reply a line on stderr gives its speed (tokens, tokens/s, time to the first token).
"""

from __future__ import annotations

import contextlib
import signal
import sys

from dllama.commands.common import add_model_arguments, check_at_least, isatty, make_sampler, open_engine, write_out

REPLY_RESERVE = 16  # a turn starts only if at least this many positions are left for the reply


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt (asked for interactively when omitted on a TTY)")
    p.add_argument("--chat-template", choices=("llama2", "llama3", "chatml", "deepseek3", "deepSeek3"), default=None,
                   help="use this built-in template instead of the model's own")
    p.add_argument("--max-tokens", type=int, default=None, help="limit on the length of one reply")


def _read(prompt: str) -> str | None:
    """A line from the user; None when they leave (Ctrl-D, or Ctrl-C at the prompt)."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        return None


def run(args) -> int:
    check_at_least("--max-tokens", args.max_tokens, 1)
    sampler = make_sampler(args)
    engine = open_engine(args)
    try:
        return _loop(engine, args, sampler)
    finally:
        engine.close()


def _loop(engine, args, sampler) -> int:
    from dllama.chat import ChatTemplate

    tok = engine.tokenizer
    chat = engine.chat if args.chat_template is None else ChatTemplate.for_tokenizer(tok, builtin=args.chat_template)
    tty = sys.stdin.isatty()
    system = args.system
    if system is None and tty:
        system = _read("💻 System prompt (optional): ")
        if system is None:
            print(file=sys.stderr)
            return 0
    history = [{"role": "system", "content": system}] if system else []
    while True:
        user = _read("\n👱 User\n> " if tty else "")
        if user is None:
            print(file=sys.stderr)
            return 0
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        ids = chat.prompt_ids(tok, history)
        if len(ids) + REPLY_RESERVE > engine.seq_len:
            print(f"\n(the context is full: this chat needs {len(ids)} of {engine.seq_len} tokens; "
                  "starting a new chat with the same system prompt)", file=sys.stderr)
            history = history[:1] if system else []
            history.append({"role": "user", "content": user})
            ids = chat.prompt_ids(tok, history)
            if len(ids) + REPLY_RESERVE > engine.seq_len:
                print("(this message alone does not fit the context)", file=sys.stderr)
                history.pop()
                continue
        if tty:
            write_out("\n🤖 Assistant\n")
        budget = engine.seq_len - len(ids)
        if args.max_tokens:
            budget = min(budget, args.max_tokens)
        reply, stopped = _reply(engine, ids, budget, sampler)
        # an interrupted reply stays as far as it got: the user saw it, and may refer to it next
        history.append({"role": "assistant", "content": reply})
        _print_speed(engine.stats, stopped)


def _reply(engine, ids: list[int], budget: int, sampler) -> tuple[str, bool]:
    """Stream one reply to stdout; (its text, whether Ctrl-C stopped it)."""
    from dllama.chat import StopDetector
    from dllama.tokenizer import StreamDecoder

    tok = engine.tokenizer
    decoder, stop = StreamDecoder(tok), StopDetector([], tok.eos_ids)
    reply_ids: list[int] = []
    with _ctrl_c_stops() as stopped:
        for t in engine.generate(ids, budget, sampler):
            write_out(stop.feed(decoder.feed(t), t))
            if stop.stopped:
                break
            reply_ids.append(t)
            if stopped():
                break
    write_out(stop.flush() + "\n")
    return tok.decode(reply_ids), stopped()


@contextlib.contextmanager
def _ctrl_c_stops():
    """While the block runs, the first Ctrl-C (SIGINT) only raises a flag, which the reply loop reads
    between tokens: a forward pass is never cut in the middle, so the KV cache and the workers stay in
    step. A second Ctrl-C before the reply ends interrupts as usual. Yields a `stopped()` callable."""
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:   # not the main thread: Ctrl-C keeps its usual meaning
        yield lambda: False
        return
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_speed(stats, stopped: bool) -> None:
    s = stats.summary()
    line = (f"{s['generated_tokens']} tokens, {s['generation_tokens_per_s']:.1f} tok/s, "
            f"first token {1000 * s['time_to_first_token_s']:.0f} ms" + (" (stopped)" if stopped else ""))
    # dim on a terminal, as `ollama run --verbose` prints its figures
    print(f"\033[2m{line}\033[0m" if isatty(sys.stderr) else line, file=sys.stderr, flush=True)
