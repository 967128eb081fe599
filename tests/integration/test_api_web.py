"""The chat page at `/` in a real browser, and `/metrics`, against a real `dllama-api` with SmolLM2.

Outside truths: the official `openai` client (the page's greedy reply must be the one it gets for the same
messages; the metrics counters must move by the usage it reports), `prometheus_client`'s own parser, and
headless Chromium (Debian's package) driven by Playwright, whose DOM decides what the page really shows.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from test_api_openai import SERVED_ID, _Client, httpx, openai, running_server
from testlib import need

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    text_string_to_metric_families = None
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [pytest.mark.slow, pytest.mark.network]

SEQ_LEN = 1024
KEY = "page-test-key"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"   # ignored by git
SLOW = 180_000   # ms: a reply on a busy 2-core machine


def _serve(smollm2_path, *extra):
    # one compute thread: see test_api_openai.server
    return running_server(smollm2_path, "--nthreads", "1", "--max-seq-len", str(SEQ_LEN), *extra)


@pytest.fixture(scope="module")
def server(smollm2_path):
    with _serve(smollm2_path) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return _Client(server, SERVED_ID)


# ---- /metrics -----------------------------------------------------------------------------------------

def _scrape(base: str) -> dict:
    need(text_string_to_metric_families is not None, "prometheus_client is not installed (pip install 'dllama[api]')")
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_counters_move_by_what_the_openai_client_was_told(server, client):
    before = _scrape(server)
    usages = [client.chat(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
                          temperature=0).usage,
              client.complete(prompt="The capital of France is", max_tokens=5, temperature=0).usage]
    stream = client.chat(messages=[{"role": "user", "content": "Count to three."}], max_tokens=6, stream=True,
                         stream_options={"include_usage": True})
    usages.append([c for c in stream if c.usage][-1].usage)
    with pytest.raises(openai.BadRequestError):
        client.chat(messages=[{"role": "user", "content": "Hi"}], n=9)   # over the 8 choices allowed
    after = _scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("dllama_tokens_generated_total") == sum(u.completion_tokens for u in usages)
    assert delta("dllama_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("dllama_generations_total") == 3
    assert delta("dllama_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert delta("dllama_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("dllama_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert delta("dllama_requests_total", endpoint="/metrics", status="200") == 1   # the first scrape
    assert delta("dllama_time_to_first_token_seconds_count") == 3
    # one decode pass per token after the first: the last token is never run through the model
    assert delta("dllama_time_per_output_token_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert delta("dllama_requests_finished_total", outcome="served") == 3
    assert after[("dllama_queue_waiting", ())] == 0 and after[("dllama_slots_in_use", ())] == 0
    assert after[("dllama_queue_capacity", ())] == 16 and after[("dllama_ready", ())] == 1
    assert after[("dllama_worker_reconnects_total", ())] == 0
    last = httpx.get(f"{server}/health").json()["last"]   # the same generation, through another endpoint
    node = (("address", "root"), ("node", "0"))
    assert after[("dllama_node_inference_ms", node)] == pytest.approx(last["avg_inference_ms"])
    assert after[("dllama_node_transfer_ms", node)] == pytest.approx(last["avg_transfer_ms"])


def test_worker_reconnects_counter_is_the_one_metrics_expose():
    need(text_string_to_metric_families is not None, "prometheus_client is not installed")
    from fastapi.testclient import TestClient
    from test_api_requests import _app

    from dllama.api import metrics

    app, engine, runner = _app()
    try:
        with TestClient(app) as c:
            def reconnects():
                families = text_string_to_metric_families(c.get("/metrics").text)
                return next(s.value for f in families for s in f.samples if s.name == "dllama_worker_reconnects_total")
            before = reconnects()
            metrics.worker_reconnects.inc()
            assert reconnects() == before + 1
    finally:
        engine.release.set()
        runner.stop()


# ---- the page in Chromium -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    need(sync_playwright is not None, "playwright is not installed (pip install 'dllama[test]')")
    need(os.path.exists(CHROMIUM), f"{CHROMIUM} not found (apt-get install chromium)")
    expect.set_options(timeout=SLOW)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class _Page:
    """A fresh browser context (empty localStorage) on the server, recording every request the page makes."""

    def __init__(self, browser, base):
        self.base, self.context = base, browser.new_context(viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.page.set_default_timeout(SLOW)
        self.requests, self.errors = [], []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def chat_requests(self):
        return [r for r in self.requests if r.url.endswith("/v1/chat/completions") and r.method == "POST"]

    def set_settings(self, **values):
        if not self.page.locator("#settings").get_attribute("open") == "":
            self.page.click("#settings summary")
        for field, value in values.items():
            self.page.fill(f"#{field}", str(value))

    def send(self, text):
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def last_reply(self):
        return self.page.locator(".msg.assistant").last

    def stored_conversation(self):
        convs = json.loads(self.page.evaluate("localStorage.getItem('dllama.conversations')"))
        current = json.loads(self.page.evaluate("localStorage.getItem('dllama.current')"))
        return next(c for c in convs if c["id"] == current)

    def close(self):
        assert not self.errors, self.errors
        assert all(r.url.startswith(self.base + "/") for r in self.requests), \
            [r.url for r in self.requests if not r.url.startswith(self.base)]   # nothing from outside
        self.context.close()


def test_page_streams_the_reply_the_api_gives_and_stops_mid_reply(browser, server, client):
    ui = _Page(browser, server)
    page = ui.page
    page.goto(f"{server}/")
    expect(page.locator("#model-name")).to_have_text(SERVED_ID)
    assert f"{SEQ_LEN} tokens" in page.text_content("#model-context")
    assert page.locator("#nodes tbody tr").count() == 1
    assert page.locator("#nodes tbody td").all_text_contents()[:2] == ["root", "100%"]

    system, question = "You are a helpful assistant. Answer briefly.", "What is the capital of France?"
    ui.set_settings(system=system, temperature=0, **{"max-tokens": 24})
    ui.send(question)
    ui.last_reply().locator(".stats").filter(has_text="tokens/s").wait_for()
    sent = ui.chat_requests()[-1].post_data_json
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    assert sent["messages"] == messages and sent["stream"] is True
    assert sent["temperature"] == 0 and sent["max_tokens"] == 24
    expected = client.chat(messages=messages, temperature=0, max_tokens=24).choices[0].message.content
    stored = ui.stored_conversation()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["content"] == expected
    assert "first token" in ui.last_reply().locator(".stats").text_content()
    # after the reply the panel shows the root's measured split, as /v1/cluster reports it
    expect(page.locator("#nodes tbody td").nth(2)).to_have_text(re.compile(r"^[0-9.]+ ms$"))

    cancelled = httpx.get(f"{server}/health").json()["requests"]["cancelled"]
    page.click("#new-chat")
    ui.set_settings(temperature=0.8, **{"max-tokens": 800})
    ui.send("Write a long story about a dragon who learns to bake bread.")
    expect(ui.last_reply().locator(".content")).to_have_text(re.compile(r"\S[\s\S]{40}"))
    partial = ui.last_reply().locator(".content").text_content()
    assert partial and page.is_visible("#stop") and not page.is_visible("#send")   # streaming, text arriving
    page.click("#stop")
    stats = ui.last_reply().locator(".stats").filter(has_text="stopped")
    stats.wait_for()
    assert "tokens/s" in stats.text_content()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    # the server saw the abort and cancelled the generation, rather than finishing it for nobody
    deadline = time.monotonic() + 60
    while httpx.get(f"{server}/health").json()["requests"]["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the server never cancelled the stopped reply"
        time.sleep(0.2)
    stored = ui.stored_conversation()["messages"][-1]["content"]
    assert stored.startswith(partial.strip()[:20]) or partial.strip()[:20] in stored
    assert page.locator("#conversations li").count() == 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-chat.png"))
    ui.close()


def test_markdown_renderer_escapes_html_and_renders_code(browser, server):
    ui = _Page(browser, server)
    page = ui.page
    page.goto(f"{server}/")
    src = ("# Title\nSome **bold** and *it* with `<b>x</b>`.\n\n<script>window.hacked=1</script>"
           "<img src=x onerror=window.hacked=1>\n\n```python\nif a < b:\n    print(\"<i>\")\n```\n"
           "- one\n- [two](https://example.org/?a=1&b=2)\n- [bad](javascript:alert(1))\n")
    page.evaluate("src => { const d = document.createElement('div'); d.id = 'md';"
                  " d.innerHTML = window.dllamaRenderMarkdown(src); document.body.append(d); }", src)
    md = page.locator("#md")
    assert md.locator("script, img").count() == 0 and page.evaluate("window.hacked") is None
    assert md.locator("h1").text_content() == "Title"
    assert md.locator("strong").text_content() == "bold" and md.locator("em").text_content() == "it"
    assert md.locator("p code").text_content() == "<b>x</b>"
    assert md.locator("pre code").text_content() == 'if a < b:\n    print("<i>")'
    assert md.locator(".code-head span").text_content() == "python"
    assert md.locator("li").count() == 3
    links = md.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/?a=1&b=2"
    assert "<script>" in md.text_content()   # shown as text, not run
    ui.close()


def test_page_asks_for_the_api_key_and_sends_it(browser, smollm2_path):
    with _serve(smollm2_path, "--api-key", KEY) as base:
        ui = _Page(browser, base)
        page = ui.page
        page.goto(f"{base}/")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        page.fill("#key-input", "wrong-key")
        page.click("#key-save")
        expect(dialog).to_be_visible()   # 401 again: asked again
        assert page.text_content("#model-name") != SERVED_ID
        page.fill("#key-input", KEY)
        page.click("#key-save")
        expect(page.locator("#model-name")).to_have_text(SERVED_ID)
        assert json.loads(page.evaluate("localStorage.getItem('dllama.apiKey')")) == KEY
        ui.set_settings(temperature=0, **{"max-tokens": 8})
        ui.send("Hi")
        ui.last_reply().locator(".stats").filter(has_text="tokens").wait_for()
        request = ui.chat_requests()[-1]
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert ui.stored_conversation()["messages"][1]["content"]
        assert not page.is_visible("#error")
        ui.close()
