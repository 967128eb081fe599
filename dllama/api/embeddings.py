"""`POST /v1/embeddings`: the mean over an input's tokens of the model's final hidden state after its
final norm (Engine.embed), run on the engine thread like a reply (dllama.api.runner.EmbedJob)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from dllama.api.errors import ApiError
from dllama.api.runner import EmbedJob
from dllama.api.schemas import EmbeddingRequest


def install(app, service) -> None:
    from dllama.api.routes import _errors, _events, _json, _Tagged

    @app.post("/v1/embeddings", responses=_errors(400, 401, 413, 422, 503))
    async def embeddings(body: EmbeddingRequest, request: Request):
        """The mean over the input's tokens of the model's final hidden state after its final norm."""
        engine = service.require_engine()
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is not supported: an embedding has the model's width "
                           f"({engine.spec.dim})", param="dimensions", code="unsupported")
        inputs = await run_in_threadpool(_embedding_inputs, engine, body.input)
        events: asyncio.Queue = asyncio.Queue()
        job = EmbedJob([], 0, None, [], asyncio.get_running_loop(), events=_Tagged(events, 0), inputs=inputs)
        service.runner.submit(job)
        vectors = None
        async for _, event in _events([job], events, request):
            vectors = event.vectors
        if vectors is None:   # the client left
            return _json({}, 499)
        n = sum(len(ids) for ids in inputs)
        return {"object": "list", "model": service.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}


MAX_EMBED_INPUTS = 64


def _embedding_inputs(engine, inp) -> list[list[int]]:
    if isinstance(inp, str) or (inp and all(isinstance(t, int) for t in inp)):
        inp = [inp]
    if not inp or len(inp) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"input: 1 to {MAX_EMBED_INPUTS} inputs, got {len(inp)}", param="input",
                       code="invalid_value")
    out, vocab = [], engine.spec.vocab_size
    for i, x in enumerate(inp):
        ids = engine.tokenizer.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise ApiError(400, f"input.{i} is empty", param="input", code="invalid_value")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"input.{i}: token ids must be in [0, {vocab})", param="input", code="invalid_value")
        if len(ids) > engine.seq_len:
            raise ApiError(400, f"input.{i} has {len(ids)} tokens; this server's context holds {engine.seq_len}",
                           param="input", code="context_length_exceeded")
        out.append(ids)
    return out


def _encode_vector(v, fmt: str):
    if fmt == "base64":   # what the openai client asks for by default: little-endian float32
        return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
    return [float(x) for x in v]
