"""/v1/embeddings against Hugging Face `transformers`: the tiny Llama of tests/data/hf_tiny (its GGUF made
by llama.cpp's converter) served in-process to the official `openai` client; HF's `LlamaModel` gives
`last_hidden_state`, the hidden state after the final norm, whose mean over the tokens must be the
embedding. Served with one slot and with two (the batched engine thread)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testlib import need_module

pytestmark = pytest.mark.slow

torch = need_module("torch", "pip install 'dllama[test]'", module=True)
transformers = need_module("transformers", "pip install 'dllama[test]'", module=True)
openai = need_module("openai", "pip install 'dllama[test]'", module=True)
TestClient = need_module("fastapi.testclient", "pip install 'dllama[api]'", module=True).TestClient

from dllama.api.routes import Service, create_app  # noqa: E402
from dllama.api.runner import EngineRunner  # noqa: E402
from dllama.engine import Engine  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "data" / "hf_tiny" / "llama"
SEQ_LEN = 128


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoModel.from_pretrained(str(TINY), torch_dtype=torch.float32).eval()


def _hf_mean(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).last_hidden_state[0].double().mean(0).numpy()


@pytest.fixture(scope="module", params=[1, 2], ids=["one-slot", "two-slots"])
def served(request):
    engine = Engine.open(str(TINY) + ".llama_cpp.gguf", nthreads=1, max_seq_len=SEQ_LEN, parallel=request.param)
    service = Service({"temperature": 0.0, "topp": 0.9, "seed": None})
    runner = EngineRunner(engine, 4)
    runner.start()
    service.ready(engine, runner)
    http = TestClient(create_app(service, max_body=1 << 20))
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), engine
    runner.stop()
    engine.close()


def test_embeddings_are_hfs_mean_pooled_last_hidden_state(served, hf):
    client, engine = served
    rng = np.random.default_rng(3)
    inputs = [[int(t) for t in rng.integers(0, 96, n)] for n in (1, 7, 45)]   # 45: two passes of 32 rows
    # without encoding_format the client asks for base64 and decodes it itself
    for kw in ({"encoding_format": "float"}, {}):
        r = client.embeddings.create(model="m", input=inputs, **kw)
        assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens == 53
        for ids, d in zip(inputs, r.data):
            ref = _hf_mean(hf, ids)
            assert len(d.embedding) == ref.size
            np.testing.assert_allclose(d.embedding, ref, atol=1e-5 * np.abs(ref).max())
    text = client.embeddings.create(model="m", input="hello world").data[0].embedding
    ref = _hf_mean(hf, engine.tokenizer.encode("hello world"))
    np.testing.assert_allclose(text, ref, atol=1e-5 * np.abs(ref).max())


def test_a_reply_after_an_embedding_is_unchanged(served):
    client, _ = served
    ask = dict(model="m", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0)
    before = client.completions.create(**ask).choices[0].text
    client.embeddings.create(model="m", input=[[9, 10, 11]])
    assert client.completions.create(**ask).choices[0].text == before


@pytest.mark.parametrize("extra, param", [({"input": [[1, 2], [96]]}, "input"), ({"input": []}, "input"),
                                          ({"input": [[]]}, "input"), ({"input": list(range(50)) * 3}, "input"),
                                          ({"input": "hi", "dimensions": 8}, "dimensions")])
def test_bad_embedding_requests_are_400_naming_the_field(served, extra, param):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="m", **extra)
    assert exc.value.body["param"] == param
