"""`dllama chat`: a terminal chat with the model's own chat template, streaming replies."""

from __future__ import annotations

import sys

from dllama.commands.common import add_model_arguments, make_sampler, open_engine

REPLY_RESERVE = 16  # a turn starts only if at least this many positions are left for the reply


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt (asked for interactively when omitted on a TTY)")
    p.add_argument("--chat-template", choices=("llama2", "llama3", "chatml", "deepseek3", "deepSeek3"), default=None,
                   help="use this built-in template instead of the model's own")
    p.add_argument("--max-tokens", type=int, default=None, help="limit on the length of one reply")


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args) -> int:
    sampler = make_sampler(args)
    engine = open_engine(args)
    try:
        return _loop(engine, args, sampler)
    finally:
        engine.close()


def _loop(engine, args, sampler) -> int:
    from dllama.chat import ChatTemplate, StopDetector
    from dllama.tokenizer import StreamDecoder

    tok = engine.tokenizer
    chat = engine.chat if args.chat_template is None else ChatTemplate.for_tokenizer(tok, builtin=args.chat_template)
    tty = sys.stdin.isatty()
    system = args.system
    if system is None and tty:
        system = _read("💻 System prompt (optional): ")
        if system is None:
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
            print("\n🤖 Assistant")
        budget = engine.seq_len - len(ids)
        if args.max_tokens:
            budget = min(budget, args.max_tokens)
        decoder, stop = StreamDecoder(tok), StopDetector([], tok.eos_ids)
        reply_ids = []
        for t in engine.generate(ids, budget, sampler):
            sys.stdout.write(stop.feed(decoder.feed(t), t))
            sys.stdout.flush()
            if stop.stopped:
                break
            reply_ids.append(t)
        sys.stdout.write(stop.flush() + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": tok.decode(reply_ids)})
