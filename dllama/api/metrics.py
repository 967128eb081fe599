"""`/metrics`: the server's counters and timings in Prometheus' text format, through `prometheus_client`.

Counters and histograms live in one process-wide registry, so code anywhere in the server can move them
(the engine thread after each generation; the reconnect logic through `worker_reconnects.inc()`). Figures
that are state rather than events (queue depth, the engine's latest per-node split) are read from the
service at scrape time by a collector, so a scrape never shows a stale copy.

Names follow Prometheus' conventions (`_total` counters, base units: seconds) under a `dllama_` prefix;
the per-node figures stay in milliseconds, as `/health` and the chat page show them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

SHARED = CollectorRegistry(auto_describe=True)

requests_total = Counter("dllama_requests", "HTTP requests answered, by endpoint and status code",
                         ["endpoint", "status"], registry=SHARED)
prompt_tokens = Counter("dllama_prompt_tokens", "Prompt tokens of finished or cancelled generations "
                        "(as usage.prompt_tokens counts them)", registry=SHARED)
prompt_tokens_reused = Counter("dllama_prompt_tokens_reused", "Prompt tokens whose K/V came from the cache "
                               "instead of being evaluated", registry=SHARED)
tokens_generated = Counter("dllama_tokens_generated", "Tokens the model generated (as "
                           "usage.completion_tokens counts them)", registry=SHARED)
generations = Counter("dllama_generations", "Generations the engine ran (finished or cancelled)",
                      registry=SHARED)
worker_reconnects = Counter("dllama_worker_reconnects", "Times the root re-established a lost worker "
                            "connection", registry=SHARED)
time_to_first_token = Histogram(
    "dllama_time_to_first_token_seconds", "From the engine starting a request to its first token "
    "(prompt evaluation; time spent queued is not included)", registry=SHARED,
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120))
time_per_token = Histogram(
    "dllama_time_per_output_token_seconds", "One decode forward pass (what one more token costs)",
    registry=SHARED, buckets=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5))

# Endpoints counted under their own name; anything else (404s for random paths) is "other", so that a
# scanner cannot grow the label set without bound.
_ENDPOINTS = ("/", "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/cluster", "/health", "/metrics")


def observe_generation(stats) -> None:
    """Count one generation's tokens and timings (the engine's `Stats`, complete once its generator closed).

    Called on the engine thread after the reply, never per token."""
    generations.inc()
    prompt_tokens.inc(stats.prompt_tokens + stats.reused_tokens)
    prompt_tokens_reused.inc(stats.reused_tokens)
    tokens_generated.inc(stats.generated)
    if stats.generated:
        time_to_first_token.observe(stats.first_token_s)
    for ms in stats.token_ms:
        time_per_token.observe(ms / 1000)


def observe_sequence(seq) -> None:
    """The same counts for one request of batched serving (dllama.batcher.Sequence), once it ended."""
    generations.inc()
    prompt_tokens.inc(len(seq.prompt_ids))
    prompt_tokens_reused.inc(seq.reused)
    tokens_generated.inc(seq.generated)
    if seq.generated:
        time_to_first_token.observe(seq.t_first - seq.t_start)
    if seq.generated > 1:
        time_per_token.observe((seq.t_end - seq.t_first) / (seq.generated - 1))


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/static/"):
        return "/static"
    return path if path in _ENDPOINTS else "other"


class RequestCounter:
    """Pure ASGI middleware counting every HTTP answer by endpoint and status, the guards' 401/413 included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if status is not None:   # None: the client left before any answer
                requests_total.labels(endpoint_label(scope["path"]), str(status)).inc()


class _ServiceCollector:
    """The service's state at scrape time: queue, slots, runner totals and the per-node split."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        s = self.service
        ready = GaugeMetricFamily("dllama_ready", "1 once the model is loaded and serving")
        ready.add_metric([], 1.0 if s.status == "ready" else 0.0)
        yield ready
        r = s.runner
        if r is None:
            return
        for name, doc, value in (("dllama_queue_waiting", "Requests waiting for the engine", r.waiting),
                                 ("dllama_queue_capacity", "Requests that may wait (--queue-size)", r.capacity),
                                 ("dllama_slots_in_use", "Requests the engine is generating now", r.slots_in_use),
                                 ("dllama_slots_total", "Requests the engine can generate at once (--parallel)",
                                  r.slots_total),
                                 ("dllama_batch_rows", "Rows (tokens) of the latest forward pass", r.last_batch)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        done = CounterMetricFamily("dllama_requests_finished", "Generation requests by outcome", labels=["outcome"])
        done.add_metric(["served"], r.served)
        done.add_metric(["cancelled"], r.cancelled)
        yield done
        yield from _node_gauges(s)


def _node_gauges(service):
    from dllama.api.web import cluster_nodes

    docs = {"inference_ms": "Latest generation: ms per token the node computed, as the node measured it",
            "transfer_ms": "Latest generation: ms per token the node spent in network exchanges (waiting, "
                           "receiving, sending), as the node measured it"}
    families = {k: GaugeMetricFamily(f"dllama_node_{k}", doc, labels=["node", "address"]) for k, doc in docs.items()}
    for node in cluster_nodes(service):
        for key, family in families.items():
            if node[key] is not None:
                family.add_metric([str(node["index"]), node["address"]], node[key])
    yield from families.values()


class _Shared:
    def collect(self):
        yield from SHARED.collect()


def registry_for(service) -> CollectorRegistry:
    """What one app's /metrics exposes: the process-wide counters plus this service's state."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Shared())
    reg.register(_ServiceCollector(service))
    return reg


def install(app, service) -> None:
    """Count requests and serve GET /metrics (open, like /health: scrapers rarely hold API keys)."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = registry_for(service)
    app.add_middleware(RequestCounter)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
