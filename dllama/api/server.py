"""`dllama-api`: serve a model (alone or over `--workers`) through an OpenAI-compatible HTTP API.

The socket opens first and the model loads in the background, so `/health` answers "loading" while the
kernels compile and the workers receive their slices; API calls get 503 + Retry-After until it is ready.
If loading fails, the server stops and the command exits 2 with the loader's one-line message.

Exposure: without an API key the server listens on loopback only (unless --insecure); browsers may call
it only from the --cors-origins named; clients must send their headers and body in time (guards.py) and
at most --max-connections are served at once. Over --workers, a lost worker degrades the server, which
reconnects by itself (healing.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import threading

from dllama.errors import DllamaError

log = logging.getLogger("dllama.api")

KEEP_ALIVE_S = 5   # s an idle kept-alive connection is held open


def serve(args, workers: list[str], open_engine) -> int:
    """`dllama-api` once commands.api has parsed its flags: serve until Ctrl-C / SIGTERM. `open_engine(args)`
    loads the model (in the background). Raises DllamaError for bad flags, a busy port, or a model that
    fails to load."""
    for dep in ("fastapi", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(dep) is None:
            raise DllamaError(f"dllama-api needs {dep}: pip install 'dllama[api]'")
    import uvicorn

    from dllama.api.guards import GuardedH11Protocol, raise_open_file_limit
    from dllama.api.routes import Service, create_app
    from dllama.net.auth import key_from_args

    _check_flags(args)
    if workers:
        key_from_args(args)   # a bad key file fails now, before the socket opens
    # every connection is a file descriptor: the cap must stay under the limit, or accept() fails instead
    max_connections = min(args.max_connections, raise_open_file_limit() - 64)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock = _listen(args.host, args.port)
    service = Service({"temperature": args.temperature, "topp": args.topp, "seed": args.seed,
                       "max_tokens": args.max_tokens}, workers, model_id=args.model_name)
    origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
    app = create_app(service, max_body=args.max_body_size, api_key=args.api_key, docs=args.docs,
                     cors_origins=origins)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3, server_header=False,
                            proxy_headers=False, http=GuardedH11Protocol, limit_concurrency=max_connections,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = _make_server(config, service)
    loader = threading.Thread(target=_load, args=(args, open_engine, service, server), name="dllama-load",
                              daemon=True)
    loader.start()
    host, port = sock.getsockname()[:2]
    print(f"dllama-api: listening on http://{host}:{port}/v1 (model loading)", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if service.runner is not None:
            service.runner.stop()
        if service.engine is not None:
            service.engine.close()
        sock.close()
    if service.status == "failed":
        raise DllamaError(service.error)
    return 0


def _make_server(config, service):
    import uvicorn

    class Server(uvicorn.Server):
        """Ends running replies at the first Ctrl-C / SIGTERM, so shutdown need not wait for them."""

        def handle_exit(self, sig, frame):
            if service.runner is not None:
                service.runner.cancel_all()
            super().handle_exit(sig, frame)

    return Server(config)


def _check_flags(args) -> None:
    # before the socket opens: a typo in the path should not look like a server that started
    from dllama.catalog import model_id, resolve_model

    path = resolve_model(args.model)
    if not os.path.isfile(path):
        raise DllamaError(f"model file not found: {args.model}")
    if args.model_name is not None and not args.model_name.strip():
        raise DllamaError("--model-name is empty")
    args.model_name = args.model_name or model_id(args.model, path)
    args.model = path
    if args.queue_size < 1:
        raise DllamaError(f"--queue-size must be at least 1, got {args.queue_size}")
    from dllama.engine import MAX_BATCH

    parallel = getattr(args, "parallel", 1)
    if not 1 <= parallel <= MAX_BATCH:
        raise DllamaError(f"--parallel must be from 1 to {MAX_BATCH}, got {parallel}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise DllamaError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_body_size < 1024:
        raise DllamaError(f"--max-body-size must be at least 1024 bytes, got {args.max_body_size}")
    if args.max_connections < 1:
        raise DllamaError(f"--max-connections must be at least 1, got {args.max_connections}")
    if args.api_key_file is not None:
        args.api_key = _read_api_key(args.api_key_file)
    if args.api_key is not None and not args.api_key.strip():
        raise DllamaError("--api-key is empty")
    from dllama.net.auth import is_loopback

    if args.api_key is None and not args.insecure and not is_loopback(args.host):
        raise DllamaError(f"refusing to listen on {args.host} without an API key: anyone who can reach it could "
                          "use it; set DLLAMA_API_KEY or --api-key-file, or pass --insecure")
    from dllama.sampler import Sampler

    Sampler(args.temperature, args.topp, args.seed)   # its DllamaError names the bad flag


def _read_api_key(path: str) -> str:
    try:
        with open(path, "rb") as f:
            key = f.read(1 << 16).strip()
    except OSError as exc:
        raise DllamaError(f"--api-key-file {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        key = key.decode()
    except UnicodeDecodeError:
        raise DllamaError(f"--api-key-file {path}: the key is not UTF-8 text") from None
    # also the systemd EnvironmentFile the roles write (DLLAMA_API_KEY=KEY), so one file serves both
    key = key.removeprefix("DLLAMA_API_KEY=").strip()
    if not key:
        raise DllamaError(f"--api-key-file {path}: the file is empty")
    return key


def _listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a busy port is a one-line error rather than a log and exit 1."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DllamaError(f"--host {host!r}: {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, type_, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DllamaError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _load(args, open_engine, service, server) -> None:
    from dllama.api.runner import EngineRunner

    on_lost = service.cluster.lost if service.cluster is not None else None
    try:
        engine = open_engine(args, on_lost=on_lost)
    except DllamaError as exc:
        service.failed(str(exc))
        server.should_exit = True
        return
    except Exception as exc:  # noqa: BLE001 - reported, then the server stops instead of hanging "loading"
        log.exception("loading the model failed")
        service.failed(f"unexpected error while loading: {exc}")
        server.should_exit = True
        return
    runner = EngineRunner(engine, args.queue_size, service.cluster)
    runner.start()
    service.ready(engine, runner)
    log.info("serving %s (context %d tokens, %d slot(s), %d node(s))", engine.name, engine.seq_len,
             getattr(engine, "n_slots", 1), 1 + len(args.workers))
