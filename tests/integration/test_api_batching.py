"""`dllama-api --parallel 4` with SmolLM2 and the official `openai` client: 8 concurrent streams (4 generate
at once, 4 wait for a slot) each get exactly the reply the same request gets alone, one abandoned midway
disturbs nobody, and /health and usage tell slots and timings."""

from __future__ import annotations

import threading
import time

import pytest

from test_api_openai import SERVED_ID, SEQ_LEN, _Client, httpx, running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]

TOPICS = ["the sea", "a red fox", "winter mornings", "prime numbers", "a lighthouse", "bread", "the moon",
          "a clock"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def server(smollm2_path):
    with running_server(smollm2_path, "--nthreads", "1", "--max-seq-len", str(SEQ_LEN), "--parallel", "4",
                        "--queue-size", "8", "--temperature", "0") as base:
        yield base


def _messages(topic: str) -> list:
    return [{"role": "user", "content": f"Write one sentence about {topic}."}]


def test_eight_concurrent_streams_each_get_their_own_reply(server):
    client = _Client(server, SERVED_ID)
    alone = {}
    for t in TOPICS:
        r = client.chat(messages=_messages(t), max_tokens=MAX_TOKENS, temperature=0)
        alone[t] = r.choices[0].message.content
        assert r.usage.completion_tokens >= 1
    assert len(set(alone.values())) == len(TOPICS), "the topics should give different replies"

    got, usage, errors = {}, {}, []
    start = threading.Barrier(len(TOPICS) + 1)

    def stream(topic: str, abandon: bool) -> None:
        try:
            start.wait()
            chunks = client.chat(messages=_messages(topic), max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                 stream_options={"include_usage": True})
            text = []
            for chunk in chunks:
                if chunk.usage is not None:
                    usage[topic] = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                    if abandon and len(text) == 2:
                        chunks.close()   # the client goes away mid-reply
                        break
            got[topic] = "".join(text)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append((topic, exc))

    threads = [threading.Thread(target=stream, args=(t, i == 0)) for i, t in enumerate(TOPICS)]
    for th in threads:
        th.start()
    start.wait()
    peak = 0
    # polled often: 8 short replies on 4 slots are over in about a second
    while any(th.is_alive() for th in threads):
        body = httpx.get(f"{server}/health", timeout=10).json()
        assert body["slots"]["total"] == 4 and 0 <= body["slots"]["in_use"] <= 4
        peak = max(peak, body["slots"]["in_use"])
        time.sleep(0.02)
    for th in threads:
        th.join()
    assert not errors, errors
    assert peak >= 2, "the streams should have run side by side"
    abandoned = TOPICS[0]
    assert alone[abandoned].startswith(got[abandoned])
    for t in TOPICS[1:]:
        assert got[t] == alone[t], f"stream about {t!r} got another reply"
        timings = usage[t].model_extra["timings"] if usage[t].model_extra else None
        assert usage[t].completion_tokens <= MAX_TOKENS and timings and timings["time_to_first_token_s"] > 0
    body = httpx.get(f"{server}/health", timeout=10).json()
    assert body["slots"]["in_use"] == 0 and body["requests"]["cancelled"] >= 1
