"""The HTTP surface: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health` (the chat page,
`/v1/cluster` and `/metrics` are in web.py and metrics.py, `/v1/embeddings` in embeddings.py).

A route validates the request (schemas.py), renders and tokenizes the prompt off the event loop, checks it
against the context, queues a job for the engine thread (runner.py), and turns the job's events into either
one JSON object or server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``). While the reply is
produced, a watcher listens for the client's disconnect and cancels the job, so an abandoned request stops
occupying the engine after at most one more token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dllama.api import embeddings, metrics, shaping, web
from dllama.api.errors import ApiError, GuardMiddleware, install_error_handlers
from dllama.api.runner import RETRY_AFTER_S, Delta, Done, Embedded, Failed, Job
from dllama.api.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, check_limits
from dllama.api.tools import ToolStream, name_tool_results, parse_tool_calls, template_message
from dllama.errors import DllamaError


class Service:
    """What the routes need: the engine (once loaded), its runner, and the server's sampling defaults."""

    def __init__(self, defaults: dict, workers=(), model_id: str | None = None):
        from dllama.api.healing import Cluster

        self.defaults = defaults          # temperature, topp, seed, max_tokens (a cap) from the command line
        self.workers = list(workers)
        self._model_id = model_id         # None: the engine's own name
        self.cluster = Cluster(self, self.workers) if self.workers else None
        self.engine = None
        self.runner = None
        self.status = "loading"           # loading | ready | degraded (a worker lost, healing) | failed
        self.error: str | None = None
        self.created = int(time.time())

    def ready(self, engine, runner) -> None:
        self.engine, self.runner = engine, runner
        self.status = "degraded" if self.cluster is not None and self.cluster.broken else "ready"
        if self.status == "degraded":   # a worker was lost while the others loaded: heal now
            runner.wake()

    def failed(self, message: str) -> None:
        self.status, self.error = "failed", message

    def degraded(self) -> None:
        if self.status == "ready":
            self.status = "degraded"

    def healed(self) -> None:
        if self.status == "degraded":
            self.status = "ready"

    def require_engine(self):
        if self.status == "degraded":
            down = [f"{n['address']} ({n.get('error', 'down')})" for n in self.cluster.nodes() if n["state"] != "up"]
            raise ApiError(503, f"the cluster is degraded, reconnecting: worker {', '.join(down)}; retry shortly",
                           code="cluster_degraded", headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.status != "ready":
            raise ApiError(503, f"the model is {self.status}; retry shortly" if self.status == "loading"
                           else f"the model failed to load: {self.error}", code=f"model_{self.status}",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.engine

    @property
    def model_id(self) -> str | None:
        """The id clients see: a catalogue name or the file's stem (never the GGUF's sentence), or --model-name."""
        return self._model_id or (self.engine.name if self.engine else None)

    def check_model(self, requested: str) -> None:
        """For looking a model up by id; generation takes any `model`, as llama-server does with one model."""
        if requested != self.model_id:
            raise ApiError(404, f"the model {requested!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")


def _errors(*statuses: int) -> dict:
    """OpenAPI documentation of the error answers a route can give (all in the same shape)."""
    why = {400: "Unsupported feature, prompt over the context, or not JSON", 401: "API key missing or wrong",
           404: "Unknown model", 413: "Body over --max-body-size", 422: "Body does not match the schema",
           503: "Model loading, cluster degraded, or queue full (see Retry-After)"}
    return {s: {"model": ErrorResponse, "description": why[s]} for s in statuses}


GENERATE_RESPONSES = {
    200: {"description": "The completion; with stream: true, server-sent events ending with data: [DONE]",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **_errors(400, 401, 413, 422, 503),
}


def create_app(service: Service, max_body: int, api_key: str | None = None, docs: bool = False,
               cors_origins=()) -> FastAPI:
    """The app. `docs` serves Swagger UI and ReDoc, whose pages the browser loads from a CDN (an offline
    cluster cannot), so they are off by default; /openapi.json is always there. Browsers may call it
    from `cors_origins` only."""
    from dllama import __version__

    app = FastAPI(title="dllama-api", version=__version__,
                  description="OpenAI-compatible API of Distributed Llama in Python",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, max_body=max_body, api_key=api_key)
    metrics.install(app, service)   # its request counter wraps the guard, so 401s and 413s are counted
    web.install(app, service)
    # Outermost, so that browser preflights (which carry no API key) are answered before the key check.
    # Only the origins the operator named: a page on any other site cannot use a server on localhost.
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.get("/health", responses={503: {"description": "Loading, degraded (a worker lost; reconnecting), or "
                                                         "failed to load (same body)"}})
    async def health():
        nodes = (service.cluster.nodes() if service.cluster is not None
                 else [{"address": "local", "role": "root", "state": "up"}])
        body = {"status": service.status, "model": service.model_id, "nodes": nodes, "workers": service.workers}
        if service.error:
            body["error"] = service.error
        if service.runner:
            r = service.runner
            body["queue"] = {"busy": r.busy, "waiting": r.waiting, "capacity": r.capacity}
            body["slots"] = {"in_use": r.slots_in_use, "total": r.slots_total, "last_batch_rows": r.last_batch}
            body["requests"] = {"served": r.served, "cancelled": r.cancelled}
            # timings of the latest generation: tokens/s, and how much of its prompt came from the KV cache
            body["last"] = service.engine.stats.summary()
        return _json(body, 200 if service.status == "ready" else 503)

    @app.get("/v1/models", responses=_errors(401, 503))
    async def list_models():
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}", responses=_errors(401, 404, 503))
    async def get_model(model_id: str):
        service.require_engine()
        service.check_model(model_id)
        return _model_card(service)

    @app.post("/v1/chat/completions", responses=GENERATE_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = service.require_engine()
        _reject_unsupported(body)
        tools = shaping.offered_tools(engine, body)
        messages = [_template_message(j, m) for j, m in enumerate(body.messages)]
        name_tool_results(messages)
        prompt_ids = await run_in_threadpool(_render_chat, engine, messages, tools)
        forced = shaping.forced_tool(body) if tools else None
        matchers = (await run_in_threadpool(shaping.matchers, engine, body.response_format, body.n or 1, tools,
                                            forced) if body.response_format or forced else None)
        return await _complete(service, request, body, prompt_ids, chat=True, tools=tools is not None,
                               matchers=matchers)

    @app.post("/v1/completions", responses=GENERATE_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        engine = service.require_engine()
        _reject_unsupported(body)
        prompt_ids = await run_in_threadpool(_encode_prompt, engine, body.prompt)
        return await _complete(service, request, body, prompt_ids, chat=False)

    embeddings.install(app, service)
    return app


def _json(body: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _model_card(service: Service) -> dict:
    service.require_engine()
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "dllama"}


# ---- request checks and prompts -----------------------------------------------------------------

MAX_CHOICES = 8   # n: each choice is a job of its own in the queue


def _reject_unsupported(body) -> None:
    def no(what: str, param: str):
        raise ApiError(400, f"{what} is not supported by this server", param=param, code="unsupported")

    if (body.n or 1) > MAX_CHOICES:
        raise ApiError(400, f"n: at most {MAX_CHOICES} choices per request", param="n", code="invalid_value")
    if isinstance(body, ChatCompletionRequest):
        if isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool):
            raise ApiError(400, "logprobs: a boolean in chat completions (top_logprobs says how many)",
                           param="logprobs", code="invalid_value")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    elif body.logprobs is not None and (isinstance(body.logprobs, bool) or not 0 <= body.logprobs <= 5):
        raise ApiError(400, "logprobs: an integer in [0, 5] in completions", param="logprobs",
                       code="invalid_value")
    too_large = check_limits(body)
    if too_large:
        raise ApiError(400, too_large, param="stop", code="invalid_value")
    if isinstance(body, ChatCompletionRequest):
        if body.functions:
            no("functions (the older form of tools)", "functions")
    else:
        if body.echo:
            no("echo", "echo")
        if body.suffix:
            no("suffix", "suffix")
        if (body.best_of or 1) > 1:
            no("best_of above 1", "best_of")


def _template_message(j: int, m) -> dict:
    if m.content is None or isinstance(m.content, str):
        content = m.content or ""
    else:
        texts = []
        for i, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content parts of type {part.type!r} are not supported (only text)",
                               param=f"messages.{j}.content.{i}.type", code="unsupported")
            texts.append(part.text)
        content = "\n".join(texts)
    out = {"role": m.role, "content": content}
    if m.name:
        out["name"] = m.name
    try:
        out.update(template_message({"tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id}, j))
    except ValueError as exc:
        raise ApiError(400, str(exc), param=f"messages.{j}.tool_calls", code="invalid_value") from None
    return out


def _render_chat(engine, messages: list[dict], tools: list | None = None) -> list[int]:
    extra = {} if tools is None else {"tools": tools}
    try:
        return engine.chat.prompt_ids(engine.tokenizer, messages, add_generation_prompt=True, **extra)
    except DllamaError as exc:   # the model's own template refused the conversation
        raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None


def _encode_prompt(engine, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 1:
            raise ApiError(400, "several prompts in one request are not supported", param="prompt",
                           code="unsupported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    vocab = engine.spec.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    return list(prompt)


def _make_jobs(service: Service, body, prompt_ids: list[int], events: asyncio.Queue, matchers=None) -> list[Job]:
    """One job per choice (`n`), each posting its events tagged with its index into `events`."""
    from dllama.sampler import Sampler

    engine = service.engine
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param=param, code="invalid_value")
    room = engine.seq_len - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context holds "
                       f"{engine.seq_len} (prompt and reply together)", param=param,
                       code="context_length_exceeded")
    d = service.defaults
    temperature = d["temperature"] if body.temperature is None else body.temperature
    topp = d["topp"] if body.top_p is None else body.top_p
    seed = d["seed"] if body.seed is None else body.seed
    # A limit past the context or the server's --max-tokens is clipped, not refused: the reply then ends
    # with finish_reason "length".
    limit = min(x for x in (room, body.token_limit, d.get("max_tokens")) if x is not None)
    loop, jobs = asyncio.get_running_loop(), []
    for i in range(body.n or 1):   # choice i samples with seed + i: n different replies, reproducibly
        base = Sampler(temperature, topp, None if seed is None else (seed + i) % 2**64)
        if matchers is not None:   # inside the request's sampler: bias and penalties first, then the mask
            from dllama.grammar import GrammarSampler

            base = GrammarSampler(base, matchers[i], engine.spec.vocab_size)
        jobs.append(Job(prompt_ids, limit, _request_sampler(engine, body, base), body.stop_strings(), loop,
                        events=_Tagged(events, i)))
    return jobs


def _request_sampler(engine, body, base):
    from dllama.api.sampling import RequestSampler, parse_logit_bias

    vocab = engine.spec.vocab_size
    try:
        bias = parse_logit_bias(body.logit_bias, vocab)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="logit_bias", code="invalid_value") from None
    if isinstance(body, ChatCompletionRequest):
        top = (body.top_logprobs or 0) if body.logprobs else None
    else:
        top = body.logprobs
    return RequestSampler(base, vocab, top, body.presence_penalty or 0.0, body.frequency_penalty or 0.0, bias,
                          unreported=engine.tokenizer.eos_ids)


# ---- replies ----------------------------------------------------------------------------------------

async def _complete(service: Service, request: Request, body, prompt_ids: list[int], chat: bool,
                    tools: bool = False, matchers=None):
    events: asyncio.Queue = asyncio.Queue()
    jobs = _make_jobs(service, body, prompt_ids, events, matchers)
    try:
        for job in jobs:
            service.runner.submit(job)
    except ApiError:
        for job in jobs:
            job.cancel()
        raise
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.model_id}
    if body.stream:
        return StreamingResponse(_sse(jobs, events, request, meta, chat, body.include_usage, service.engine, tools),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    parts, records, done = [[] for _ in jobs], [[] for _ in jobs], [None] * len(jobs)
    async for i, event in _events(jobs, events, request):
        if isinstance(event, Delta):
            parts[i].append(event.text)
            records[i] += event.logprobs or ()
        elif isinstance(event, Done):
            done[i] = event
    if None in done:   # the client left; nobody reads this
        return _json({}, 499)
    choices = []
    for i, job in enumerate(jobs):
        text = "".join(parts[i])
        lp = _logprobs(service.engine, chat, records[i]) if job.sampler.top_n is not None else None
        if chat:
            message, finish = _assistant(text, done[i].finish_reason, tools)
            choices.append({"index": i, "message": {"role": "assistant", **message}, "logprobs": lp,
                            "finish_reason": finish})
        else:
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": done[i].finish_reason})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": _usage(done)}


def _assistant(text: str, finish: str, tools: bool) -> tuple[dict, str]:
    """The reply as a message (content, or tool_calls when tools were offered and the model called one)."""
    if not tools:
        return {"content": text}, finish
    content, calls = parse_tool_calls(text)
    if not calls:
        return {"content": text}, finish
    return {"content": content, "tool_calls": calls}, "tool_calls"


def _logprobs(engine, chat: bool, records, offset: int = 0) -> dict:
    from dllama.api.sampling import chat_logprobs, completion_logprobs

    return chat_logprobs(engine.tokenizer, records) if chat else completion_logprobs(engine.tokenizer, records, offset)


def _usage(done: list[Done]) -> dict:
    """The prompt counts once however many choices; the choices' tokens add up (as OpenAI counts)."""
    prompt, completion = done[0].prompt_tokens, sum(d.completion_tokens for d in done)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if done[0].timings:
        usage["timings"] = done[0].timings
    return usage


_GONE = object()   # the client disconnected: stop reading the jobs' events


class _Tagged:
    """A job's event queue as the job sees it: the events go to the request's queue, tagged with the choice."""

    def __init__(self, events: asyncio.Queue, index: int):
        self.events, self.index = events, index

    def put_nowait(self, event) -> None:
        self.events.put_nowait((self.index, event))


async def _events(jobs: list[Job], events: asyncio.Queue, request: Request):
    """(choice, event) until every job is Done or one Failed (raised as ApiError); cancels the jobs if the
    caller stops early or the client disconnects."""
    watcher = asyncio.create_task(_watch_disconnect(request, jobs, events))
    running = len(jobs)
    try:
        while running:
            i, event = await events.get()
            if event is _GONE:
                return
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, code="generation_failed")
            yield i, event
            running -= isinstance(event, (Done, Embedded))
    finally:
        for job in jobs:
            job.cancel()
        watcher.cancel()


async def _watch_disconnect(request: Request, jobs: list[Job], events: asyncio.Queue) -> None:
    # The body was already read, so the next message the server has for us is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            events.put_nowait((None, _GONE))
            return


async def _sse(jobs: list[Job], events: asyncio.Queue, request: Request, meta: dict, chat: bool,
               include_usage: bool, engine, tools: bool = False):
    """With tools offered, a choice's content streams as it comes, and what may be a tool call is held until
    it is whole and sent as one `tool_calls` delta (tools.ToolStream)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    offsets, n_calls = [0] * len(jobs), [0] * len(jobs)

    def chunk(i: int, delta: str | None, finish: str | None, role: bool = False, records=None, call=None) -> str:
        lp = None if records is None else _logprobs(engine, chat, records, offsets[i])
        offsets[i] += len(delta or "")
        if chat:
            d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            if call:   # with its `index` among the choice's calls, as OpenAI streams them
                d["tool_calls"] = [{"index": n_calls[i], **call}]
                n_calls[i] += 1
            choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta or "", "logprobs": lp, "finish_reason": finish}
        obj = {**meta, "object": kind, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return _data(obj)

    if chat:
        for i in range(len(jobs)):
            yield chunk(i, None, None, role=True)
    done, streams = [None] * len(jobs), [ToolStream() if tools else None for _ in jobs]
    held = [None if job.sampler.top_n is None else [] for job in jobs]   # logprobs not yet sent

    def pieces(i: int, out: list):
        for content, call in out:
            records = held[i]
            if records is not None:
                held[i] = []
            yield chunk(i, content, None, records=records, call=call)

    try:
        async for i, event in _events(jobs, events, request):
            if isinstance(event, Delta) and tools:
                if held[i] is not None:
                    held[i] += event.logprobs or ()
                for text in pieces(i, streams[i].feed(event.text)):
                    yield text
            elif isinstance(event, Delta):
                yield chunk(i, event.text, None, records=event.logprobs)
            elif isinstance(event, Done):
                done[i] = event
                finish = event.finish_reason
                if tools:
                    for text in pieces(i, streams[i].end()):
                        yield text
                    finish = "tool_calls" if streams[i].calls else finish
                yield chunk(i, None, finish, records=held[i] or None)
        if include_usage and None not in done:
            yield _data({**meta, "object": kind, "choices": [], "usage": _usage(done)})
    except ApiError as exc:
        # The status line is already sent: report the failure in-band, as OpenAI does.
        from dllama.api.errors import error_body

        yield _data(error_body(exc.status, exc.message, code=exc.code))
        return
    yield "data: [DONE]\n\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
