"""Request validation, error shapes, the API key, the body limit and the queue bound of `dllama-api`.

These run the real app in-process with a stand-in engine (no model): everything here is decided before a
request reaches the model, except the queue test, whose engine blocks until released. What a real model
answers is tested in test_api_openai.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from testlib import need_module

TestClient = need_module("fastapi.testclient", "pip install 'dllama[api]'", module=True).TestClient

from dllama.api.routes import Service, create_app  # noqa: E402
from dllama.api.runner import EngineRunner  # noqa: E402

MAX_BODY = 64 * 1024
SEQ_LEN = 64


class _Tokenizer:
    """One id per byte, plus an end-of-turn id: enough to measure prompts against the context."""

    eos_ids = [256]

    def encode(self, text, add_bos=None, parse_special=True):
        return list(text.encode())

    def token_bytes(self, token_id):
        return bytes([token_id]) if token_id < 256 else b"<end>"


class _Chat:
    def prompt_ids(self, tokenizer, messages, add_generation_prompt=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tokenizer.encode(text)


class _BlockingEngine:
    """Generates nothing until `release` is set: holds the engine thread so the queue fills up."""

    def __init__(self):
        self.name, self.seq_len = "fake-model", SEQ_LEN
        self.spec = SimpleNamespace(vocab_size=257)
        self.tokenizer, self.chat = _Tokenizer(), _Chat()
        self.release, self.started = threading.Event(), threading.Event()
        self.stats = SimpleNamespace(summary=dict)

    def generate(self, prompt_ids, max_tokens, sampler, stop_ids=None):
        self.started.set()
        self.release.wait(10)
        yield 256


def _app(api_key=None, queue_size=2, model_id=None, docs=False, cors_origins=()):
    engine = _BlockingEngine()
    service = Service({"temperature": 0.0, "topp": 0.9, "seed": None}, model_id=model_id)
    runner = EngineRunner(engine, queue_size)
    runner.start()
    service.ready(engine, runner)
    return (create_app(service, max_body=MAX_BODY, api_key=api_key, docs=docs, cors_origins=cors_origins),
            engine, runner)


@pytest.fixture(scope="module")
def client():
    app, engine, runner = _app()
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    engine.release.set()
    runner.stop()


def _assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def test_malformed_json_is_400(client):
    r = client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    err = _assert_error(r, 400)
    assert "JSON" in err["message"]


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": 3}, "temperature"),
    ({"messages": HELLO, "max_tokens": "5"}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "stop": 5}, "stop"),
    ({"messages": HELLO, "seed": 2**70}, "seed"),
])
def test_schema_violations_are_422_naming_the_field(client, body, param):
    err = _assert_error(client.post(CHAT, json=body), 422)
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
])
def test_unsupported_features_are_400_saying_so(client, extra, param):
    err = _assert_error(client.post(CHAT, json={"messages": HELLO, **extra}), 400, param)
    if param != "stop":
        assert "not supported" in err["message"]


@pytest.mark.parametrize("url, extra, param, says", [
    (CHAT, {"logit_bias": {"257": 1}}, "logit_bias", "token id 257 is not in the vocabulary"),
    (CHAT, {"logit_bias": {"ten": 1}}, "logit_bias", "'ten' is not a token id"),
    (CHAT, {"logit_bias": {"5": -101}}, "logit_bias", "[-100, 100]"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    (CHAT, {"logprobs": 3}, "logprobs", "a boolean"),
    ("/v1/completions", {"logprobs": 6}, "logprobs", "[0, 5]"),
    (CHAT, {"n": 9}, "n", "at most 8 choices"),
    ("/v1/completions", {"logprobs": True}, "logprobs", "[0, 5]"),
])
def test_bad_sampling_fields_are_400_naming_them(client, url, extra, param, says):
    body = {"messages": HELLO} if url == CHAT else {"prompt": "hi"}
    err = _assert_error(client.post(url, json={**body, **extra}), 400, param)
    assert says in err["message"]


@pytest.mark.parametrize("extra, param", [({"top_logprobs": 21}, "top_logprobs"),
                                          ({"presence_penalty": 2.5}, "presence_penalty"),
                                          ({"frequency_penalty": -3}, "frequency_penalty"),
                                          ({"logit_bias": {"5": "up"}}, "logit_bias")])
def test_sampling_fields_out_of_range_are_422(client, extra, param):
    err = _assert_error(client.post(CHAT, json={"messages": HELLO, **extra}), 422)
    assert err["param"].startswith(param), err


def test_image_parts_are_400(client):
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    err = _assert_error(client.post(CHAT, json={"messages": [{"role": "user", "content": parts}]}), 400)
    assert "image_url" in err["message"]


def test_any_model_name_gets_the_one_served_model_and_its_real_id():
    # llama-server's behaviour with one model: chat UIs that remember another name keep working
    app, engine, runner = _app(model_id="smollm2_135m_instruct")
    engine.release.set()
    try:
        with TestClient(app) as c:
            for model in ("gpt-9", "Smollm2 135M 8k Lc100K Mix1 Ep2", None):
                body = {"messages": HELLO, "max_tokens": 1} | ({"model": model} if model else {})
                r = c.post(CHAT, json=body)
                assert r.status_code == 200 and r.json()["model"] == "smollm2_135m_instruct", r.text
            r = c.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "smollm2_135m_instruct"
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2_135m_instruct"]
            assert c.get("/health").json()["model"] == "smollm2_135m_instruct"
            # looking a model up by id is another matter: only the served one exists
            err = _assert_error(c.get("/v1/models/gpt-9"), 404)
            assert err["code"] == "model_not_found" and "smollm2_135m_instruct" in err["message"]
    finally:
        engine.release.set()
        runner.stop()


def test_swagger_ui_is_off_by_default_and_the_spec_is_served():
    # Swagger UI and ReDoc pages load their scripts from a CDN, which an offline cluster cannot reach.
    for docs in (False, True):
        app, engine, runner = _app(docs=docs)
        try:
            with TestClient(app) as c:
                assert c.get("/openapi.json").json()["info"]["title"] == "dllama-api"
                for page in ("/docs", "/redoc"):
                    r = c.get(page)
                    if docs:
                        assert r.status_code == 200 and "cdn.jsdelivr.net" in r.text
                    else:
                        _assert_error(r, 404)
        finally:
            engine.release.set()
            runner.stop()


def test_prompt_over_the_context_is_400(client):
    long = [{"role": "user", "content": "x" * SEQ_LEN}]
    err = _assert_error(client.post(CHAT, json={"messages": long}), 400)
    assert err["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"prompt": [SEQ_LEN + 1000]})
    _assert_error(r, 400, "prompt")
    _assert_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(client, chunked):
    data = b'{"messages": [{"role": "user", "content": "' + b"x" * MAX_BODY + b'"}]}'
    if chunked:   # no Content-Length: the limit must hold while reading
        r = client.post(CHAT, content=iter([data[i:i + 4096] for i in range(0, len(data), 4096)]),
                        headers={"content-type": "application/json"})
    else:
        r = client.post(CHAT, content=data, headers={"content-type": "application/json"})
    _assert_error(r, 413)


def test_unknown_path_and_method_are_json(client):
    _assert_error(client.get("/v1/nothing"), 404)
    _assert_error(client.get(CHAT), 405)


def test_models_lists_the_served_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["fake-model"]
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"


def test_api_key_is_required_when_set():
    app, engine, runner = _app(api_key="s3cret")
    try:
        with TestClient(app) as c:
            _assert_error(c.get("/v1/models"), 401)
            _assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/health").status_code == 200   # probes need no key
    finally:
        engine.release.set()
        runner.stop()


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def test_browsers_may_call_it_only_from_the_configured_origins():
    app, engine, runner = _app(api_key="s3cret", cors_origins=["http://chat.example"])
    try:
        with TestClient(app) as c:
            pre = c.options(CHAT, headers={"Origin": "http://chat.example", **PREFLIGHT})
            assert pre.status_code == 200   # preflights carry no key and must not get a 401
            assert pre.headers["access-control-allow-origin"] == "http://chat.example"
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            r = c.get("/v1/models", headers={"Origin": "http://chat.example", "Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://chat.example"
            other = c.options(CHAT, headers={"Origin": "http://evil.example", **PREFLIGHT})
            assert "access-control-allow-origin" not in other.headers
    finally:
        engine.release.set()
        runner.stop()


def test_no_origin_is_allowed_by_default():
    app, engine, runner = _app()
    try:
        with TestClient(app) as c:
            r = c.get("/health", headers={"Origin": "http://evil.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
            pre = c.options(CHAT, headers={"Origin": "http://evil.example", **PREFLIGHT})
            assert "access-control-allow-origin" not in pre.headers
    finally:
        engine.release.set()
        runner.stop()


def test_loading_server_answers_503_with_retry_after():
    service = Service({"temperature": 0.0, "topp": 0.9, "seed": None})
    with TestClient(create_app(service, max_body=MAX_BODY)) as c:
        assert c.get("/health").json()["status"] == "loading"
        r = c.post(CHAT, json={"messages": HELLO})
        _assert_error(r, 503)
        assert r.headers["retry-after"]


def test_full_queue_answers_503_with_retry_after_and_recovers():
    app, engine, runner = _app(queue_size=1)
    try:
        with TestClient(app) as c:
            results = {}

            def post(i):
                results[i] = c.post(CHAT, json={"messages": HELLO, "max_tokens": 1})

            first = threading.Thread(target=post, args=(0,))
            first.start()
            assert engine.started.wait(10)          # the engine thread is busy with request 0
            second = threading.Thread(target=post, args=(1,))
            second.start()
            for _ in range(200):                    # request 1 waits in the queue (capacity 1)
                if runner.waiting == 1:
                    break
                threading.Event().wait(0.01)
            r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 1})
            err = _assert_error(r, 503)
            assert err["code"] == "queue_full" and int(r.headers["retry-after"]) > 0
            engine.release.set()
            first.join(10)
            second.join(10)
            assert results[0].status_code == 200 and results[1].status_code == 200
            assert results[0].json()["choices"][0]["finish_reason"] == "stop"
    finally:
        engine.release.set()
        runner.stop()


def test_model_name_flag_overrides_the_id_and_the_default_is_the_file_stem(tmp_path):
    import argparse

    from dllama.api import server
    from dllama.commands import api as api_command
    from dllama.errors import DllamaError

    model = tmp_path / "My Model.Q4_0.gguf"
    model.write_bytes(b"GGUF")  # only its existence is checked before the server starts
    p = argparse.ArgumentParser()
    api_command.add_arguments(p)
    for extra, expected in (([], "My-Model.Q4_0"), (["--model-name", "mine"], "mine")):
        args = p.parse_args(["--model", str(model), *extra])
        server._check_flags(args)
        assert args.model_name == expected
    with pytest.raises(DllamaError, match="--model-name is empty"):
        server._check_flags(p.parse_args(["--model", str(model), "--model-name", " "]))


@pytest.mark.parametrize("content", ["s3cret\n", "DLLAMA_API_KEY=s3cret\n"], ids=["plain", "env-file"])
def test_api_key_file_holds_the_key_plain_or_as_the_roles_env_file(tmp_path, content):
    import argparse

    from dllama.api import server
    from dllama.commands import api as api_command

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    key = tmp_path / "api.key"
    key.write_text(content)
    p = argparse.ArgumentParser()
    api_command.add_arguments(p)
    args = p.parse_args(["--model", str(model), "--api-key-file", str(key), "--host", "0.0.0.0"])
    server._check_flags(args)   # a key, so a non-loopback host is allowed
    assert args.api_key == "s3cret"
