"""`dllama-api`: the flags of the OpenAI-compatible HTTP server (dllama.api.server does the work)."""

from __future__ import annotations

import os

from dllama.commands.common import add_model_arguments, check_port, open_engine, parse_workers

DEFAULT_PORT = 9990               # the reference's
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes: a full 128k-token context is ~0.5 MB of text, JSON-escaped
DEFAULT_MAX_CONNECTIONS = 512


def add_arguments(p) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                        "interface needs an API key or --insecure)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0: any free port)")
    g.add_argument("--api-key", default=os.environ.get("DLLAMA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env DLLAMA_API_KEY, else none)")
    g.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="read the API key from this file instead (trailing whitespace stripped)")
    g.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback --host without an API key: anyone who can reach it may use it")
    g.add_argument("--cors-origins", default="",
                   help="comma-separated origins browsers may call this API from, or '*' (default: none)")
    g.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"open connections served at once; requests beyond get 503 (default "
                        f"{DEFAULT_MAX_CONNECTIONS})")
    g.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait for the engine; more get 503 + Retry-After (default 16)")
    g.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="conversations generated at once, each with its own KV cache of --max-seq-len tokens, "
                        "sharing every forward pass (default 1; at most 32)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="longest reply any request may get, in tokens (default: what the context leaves)")
    g.add_argument("--max-body-size", type=int, default=DEFAULT_MAX_BODY,
                   help=f"largest request body in bytes; larger get 413 (default {DEFAULT_MAX_BODY})")
    g.add_argument("--model-name", help="the model's id in the API (default: its catalogue name, else the "
                                        "file name without its extension)")
    g.add_argument("--docs", action="store_true",
                   help="serve Swagger UI at /docs and ReDoc at /redoc (the browser loads them from a CDN)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info)")


def run(args) -> int:
    check_port("--port", args.port, listen=True)
    workers = [f"{h}:{p}" for h, p in parse_workers(args.workers)]
    from dllama.api.server import serve

    return serve(args, workers, open_engine)
