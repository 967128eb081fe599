"""The chat page at `/` and the `/v1/cluster` figures it shows.

The page is three static files shipped in the package (`static/`): no CDN, no build step, so it works on a
cluster that has no internet. It talks to the same `/v1` API as any client (the API key, when one is set,
is asked for in the page and sent as a bearer token), so the page itself and its assets stay open.
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).with_name("static")

# Everything the page loads comes from this server; inline scripts and styles are not needed either.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def cluster_nodes(service) -> list[dict]:
    """Each node: address, share of the model, and the latest generation's compute/transfer ms per token
    (over its decode passes), each node's own: the root's time in its kernels and waiting on the sockets
    (which includes waiting for the workers), each worker's as it reported it (protocol TIMES). None until
    a generation has run a decode pass."""
    engine = service.engine
    addresses = ["root"] + list(service.workers)
    shares = _shares(engine, len(addresses))
    last = engine.stats.summary() if engine is not None else {}
    measured = last.get("nodes", []) if last.get("avg_token_ms") else []
    nodes = []
    for i, address in enumerate(addresses):
        node = {"index": i, "address": address, "role": "root" if i == 0 else "worker",
                "share": shares[i] if shares else None, "inference_ms": None, "transfer_ms": None}
        if i < len(measured):
            node.update(measured[i])
        nodes.append(node)
    return nodes


def _shares(engine, n_nodes: int) -> list[float] | None:
    """Each node's fraction of the FFN rows (its heads' fraction is the same within a block): the plan the
    cluster runs, weighted by --split, or the even one."""
    spec = getattr(engine, "spec", None)
    if spec is None or not getattr(spec, "ffn_dim", None):
        return None
    from dllama.model.partition import partition

    plan = getattr(getattr(engine, "coll", None), "plan", None)
    if not isinstance(plan, list) or len(plan) != n_nodes:
        plan = partition(spec, n_nodes)
    return [len(s.ffn) / spec.ffn_dim for s in plan]


def install(app, service) -> None:
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from dllama.api.routes import _errors

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _CSP,
                                                            "Cache-Control": "no-cache"})

    @app.get("/v1/cluster", responses=_errors(401, 503))
    async def cluster():
        """The served model, its context, and each node's share and latest per-token timings."""
        engine = service.require_engine()
        return {"object": "cluster", "model": service.model_id, "context_length": engine.seq_len,
                "nodes": cluster_nodes(service), "last": engine.stats.summary()}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
