"""`dllama convert --hf DIR` against two outside truths: llama.cpp's own `convert_hf_to_gguf.py` and
Hugging Face `transformers`.

- tests/data/hf_tiny/: tiny seeded checkpoints (bf16, as save_pretrained writes them, with a tokenizer)
  and the F32 GGUF llama.cpp's converter made of each (make_fixtures.py there says how). Our GGUF of the
  same folder must hold the same tensors bit for bit (names, types, shapes, Q/K order, stacked experts)
  and the same vocabulary; our `.m` of it must equal `dllama convert` of llama.cpp's GGUF byte for byte in
  every weight type; all of them give transformers' logits.
- Checkpoints saved at test time (f32, f16, bf16) at the parity tests' shapes: dllama's logits from the
  converted `.m` within 1e-4 of transformers on 1 node and split over 2 and 4 (F32 buffers).
- Bad folders: one line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from testlib import DATA, need_module

pytestmark = pytest.mark.slow

torch = need_module("torch", "the Hugging Face conversion tests: pip install 'dllama[test]'", module=True)
need_module("transformers", "the Hugging Face conversion tests: pip install 'dllama[test]'", module=True)
gguf = need_module("gguf", "pip install gguf", module=True)

import hf_checkpoint as C   # noqa: E402  (needs torch)
import hf_export as H   # noqa: E402

from dllama.engine import Engine  # noqa: E402
from dllama.formats.hf_convert import convert_hf  # noqa: E402

TINY = DATA / "hf_tiny"
TINY_CASES = ["llama", "llama31", "mistral", "mixtral", "qwen3", "qwen3_moe"]
TOL_F = 1e-4
# metadata both converters write, compared value for value
SHARED_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.freq_base",
               "attention.layer_norm_rms_epsilon", "expert_count", "expert_used_count",
               "expert_feed_forward_length")
TOKENIZER_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id")


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy().astype(np.float32)


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _prompt(seed: int, vocab: int, n: int = 40) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def _dllama_logits(path, ids, tokenizer=None) -> np.ndarray:
    eng = Engine.open(str(path), None if tokenizer is None else str(tokenizer), nthreads=1)
    try:
        return eng.prefill(ids).copy()
    finally:
        eng.close()


def _fields(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


@pytest.mark.parametrize("case", TINY_CASES)
def test_gguf_equals_llama_cpp_converter_tensor_by_tensor(tmp_path, case):
    ours_path = tmp_path / f"{case}.gguf"
    convert_hf(str(TINY / case), str(ours_path), None, "f32")
    theirs, their_kv = _fields(TINY / f"{case}.llama_cpp.gguf")
    ours, our_kv = _fields(ours_path)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        o = ours[name]
        assert (o.tensor_type, list(o.shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(o.data, t.data), f"{case}: {name} differs from llama.cpp's"
    arch = their_kv["general.architecture"]
    assert our_kv["general.architecture"] == arch
    for k in SHARED_KEYS:
        assert our_kv.get(f"{arch}.{k}") == their_kv.get(f"{arch}.{k}"), k
    for k in TOKENIZER_KEYS:
        assert our_kv.get(f"tokenizer.ggml.{k}") == their_kv.get(f"tokenizer.ggml.{k}"), k
    assert our_kv["tokenizer.chat_template"] == their_kv["tokenizer.chat_template"]


@pytest.mark.parametrize("weight_type, qtype", [("q80", "Q8_0"), ("q40", "Q4_0"), ("f16", "F16")])
@pytest.mark.parametrize("case", ["llama", "mixtral", "qwen3_moe"])
def test_quantized_gguf_is_the_gguf_packages_quantization_of_llama_cpps_tensors(tmp_path, case, weight_type, qtype):
    """Vectors and the router stay F32, every other matrix is `gguf.quants.quantize` of llama.cpp's F32
    tensor, bit for bit. (llama.cpp's converter itself, run with --outtype q8_0 and f16 on these folders,
    wrote the same bytes when they were made; it has no q4_0 output.)"""
    out = tmp_path / "q.gguf"
    convert_hf(str(TINY / case), str(out), None, weight_type)
    theirs, _ = _fields(TINY / f"{case}.llama_cpp.gguf")
    ours, kv = _fields(out)
    assert kv["general.file_type"] == {"q80": 7, "q40": 2, "f16": 1}[weight_type]
    for name, t in theirs.items():
        x = np.ascontiguousarray(t.data)
        want_type = gguf.GGMLQuantizationType.F32 if x.ndim == 1 or "ffn_gate_inp" in name \
            else gguf.GGMLQuantizationType[qtype]
        want = gguf.quants.quantize(x, want_type)
        assert ours[name].tensor_type == want_type, name
        assert np.array_equal(np.asarray(ours[name].data).view(np.uint8).ravel(), want.view(np.uint8).ravel()), name


@pytest.mark.parametrize("case", TINY_CASES)
def test_every_conversion_of_a_checkpoint_gives_transformers_logits(tmp_path, case):
    """llama.cpp's GGUF, our GGUF and our `.m` + `.t` (F32 weights) all run to transformers' logits."""
    model = C.load(TINY / case)
    ids = _prompt(1, model.config.vocab_size)
    ref = _hf_logits(model, ids)
    m, t, g = tmp_path / "m.m", tmp_path / "m.t", tmp_path / "m.gguf"
    convert_hf(str(TINY / case), str(m), str(t), "f32")
    convert_hf(str(TINY / case), str(g), None, "f32")
    for path, tok in ((TINY / f"{case}.llama_cpp.gguf", None), (g, None), (m, t)):
        got = _dllama_logits(path, ids, tok)
        assert _rel(got, ref) < TOL_F, f"{case} {path.name}: {_rel(got, ref):.2e} of max"


@pytest.mark.parametrize("weight_type", ["q40", "q80", "f16"])
@pytest.mark.parametrize("case", ["llama", "mixtral", "qwen3_moe"])
def test_m_file_equals_the_one_converted_from_llama_cpps_gguf(tmp_path, case, weight_type):
    """Quantized straight from the checkpoint or from llama.cpp's F32 GGUF: the same bytes."""
    from dllama.formats.convert import convert

    ours, theirs = tmp_path / "hf.m", tmp_path / "gguf.m"
    convert_hf(str(TINY / case), str(ours), None, weight_type)
    convert(str(TINY / f"{case}.llama_cpp.gguf"), str(theirs), None, weight_type)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_experts_fused_as_transformers_5_holds_them_convert_the_same(tmp_path, kind):
    """A state_dict saved as transformers 5 holds it in memory (router under mlp., experts fused into
    gate_up_proj / down_proj per layer) gives the GGUF of the per-expert checkpoint, byte for byte."""
    from safetensors.torch import save_file

    plain, fused = tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt"   # one name: the GGUFs' general.name
    C.save_checkpoint(H.build(kind, 4), plain, "float32")
    shutil.copytree(plain, fused)
    (fused / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in H.build(kind, 4).state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    convert_hf(str(plain), str(tmp_path / "a.gguf"), None, "f32")
    convert_hf(str(fused), str(tmp_path / "b.gguf"), None, "f32")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_tokenizer_reads_as_transformers_encodes(tmp_path):
    from transformers import AutoTokenizer

    from dllama.tokenizer import Tokenizer

    folder = TINY / "qwen3"
    convert_hf(str(folder), str(tmp_path / "m.m"), str(tmp_path / "m.t"), "f32")
    ref = AutoTokenizer.from_pretrained(str(folder))
    ours_t = Tokenizer.from_t(tmp_path / "m.t")
    convert_hf(str(folder), str(tmp_path / "m.gguf"), None, "f32")
    ours_g = Tokenizer.from_gguf(tmp_path / "m.gguf")
    for text in ["the quick brown fox", "hello world, 123 go!", "<|im_start|>user\nhi<|im_end|>"]:
        want = ref.encode(text, add_special_tokens=False)
        assert ours_g.encode(text, add_bos=False) == want, text
        assert ours_g.decode(want) == ref.decode(want)
        assert ours_t.decode(want) == ref.decode(want)
    assert ours_t.chat_template == ours_g.chat_template == (folder / "chat_template.jinja").read_text()
    assert ours_g.eos_id == ref.eos_token_id and ours_g.bos_id == ref.bos_token_id


def _pre_tokenizers():
    from tokenizers import Regex, pre_tokenizers as P

    from dllama.formats.hf_tokenizer import _LLAMA3_RE, _QWEN2_RE

    def split(regex):
        return P.Sequence([P.Split(Regex(regex), behavior="isolated"),
                           P.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {"gpt-2": P.ByteLevel(add_prefix_space=False), "qwen2": split(_QWEN2_RE),
            "llama-bpe": split(_LLAMA3_RE),
            "smollm": P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False)])}


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe", "smollm"])
def test_byte_level_pre_tokenizers_are_named_and_encode_as_transformers(tmp_path, pre):
    """The pre-tokenizer of tokenizer.json (Qwen's and Llama 3's Split regexes, SmolLM's single digits,
    GPT-2's) becomes the `tokenizer.ggml.pre` whose splitting gives transformers' ids."""
    from dllama.formats.hf_tokenizer import read_tokenizer

    ref = C.save_tokenizer(tmp_path, 300, _pre_tokenizers()[pre])
    ours = read_tokenizer(str(tmp_path), 0, {})
    assert ours.pre == pre
    for text in ["the quick brown fox 12345 jumps!", "hello   world,\n\n123 go?  yes:they do.", "it's 4567'll"]:
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text


def test_sentencepiece_style_tokenizer_json_encodes_as_transformers(tmp_path):
    """Llama 2 / Mistral v0.1 vocabularies (byte fallback, `▁`): the `llama` kind, merges ranked by score."""
    from dllama.formats.dlt import write_t
    from dllama.formats.hf_tokenizer import read_tokenizer
    from dllama.tokenizer import Tokenizer

    ref = C.save_spm_tokenizer(tmp_path)
    ours = read_tokenizer(str(tmp_path), 0, {})
    write_t(tmp_path / "t.t", ours)
    from_t = Tokenizer.from_t(tmp_path / "t.t")
    assert (ours.kind, ours.bos_id, ours.eos_id, ours.add_bos) == ("llama", 1, 2, True)
    for text in ["the quick brown fox", "hello world, 123 go!", "über naïve 🦙 fox", " two  spaces\n"]:
        want = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False) == want, text
        assert ours.decode(want) == ref.decode(want), text
        # a `.t` file has no add-space-prefix flag: the first token's `▁` comes back as a space
        assert from_t.decode(want) == " " + ref.decode(want), text


# ---- checkpoints saved here, at the parity tests' shapes, split over nodes

SPLIT_CASES = {
    "llama": (dict(kind="llama"), "float32", (1, 2)),
    "llama-mha-tied": (dict(kind="llama", tied=True, num_key_value_heads=4, head_dim=32), "float16", (4,)),
    "mistral": (dict(kind="mistral"), "bfloat16", (2,)),
    "mixtral-llama31": (dict(kind="mixtral", rope=H.LLAMA3_ROPE), "bfloat16", (1, 2)),
    "qwen3": (dict(kind="qwen3"), "bfloat16", (1, 2)),
    "qwen3-mha-tied": (dict(kind="qwen3", tied=True, num_key_value_heads=4), "float16", (4,)),
    "qwen3-moe": (dict(kind="qwen3_moe"), "float32", (1, 2)),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_converted_m_matches_transformers_on_one_and_more_nodes(tmp_path, name):
    from unit.test_tensor_parallel import build, greedy

    from dllama.formats.loader import load_model

    args, dtype, node_counts = SPLIT_CASES[name]
    args = dict(args)
    kind = args.pop("kind")
    # each node's FFN rows must be whole blocks of 32: 128 rows split in 2 and 4
    model = C.save_checkpoint(H.build(kind, 5, intermediate_size=128, **args), tmp_path / "ckpt", dtype)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == dtype
    m = tmp_path / "model.m"
    convert_hf(str(tmp_path / "ckpt"), str(m), None, "f32")
    ids = _prompt(3, model.config.vocab_size, 24)
    expect, seq = [], list(ids)
    for _ in range(4):
        expect.append(int(np.argmax(_hf_logits(model, seq))))
        seq.append(expect[-1])
    for n_nodes in node_counts:
        with load_model(str(m)) as loaded:
            spec = loaded.spec
            spec.seq_len = 64
            got, first = greedy(build(spec, loaded.tensors, n_nodes), ids, 4)
        assert _rel(first, _hf_logits(model, ids)) < TOL_F, f"{name} on {n_nodes} nodes"
        assert got == expect, f"{name} on {n_nodes} nodes"


# ---- bad input: one line, exit status 2, nothing written

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dllama", "convert", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _copy_tiny(tmp_path, case="llama"):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY / case, folder)
    return folder


def _safetensors(path, tensors: dict) -> None:
    """A safetensors file by hand: {name: (dtype string, shape, raw bytes)}."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(r for _, _, r in tensors.values()))


def _break_not_a_checkpoint(folder):
    (folder / "config.json").unlink()
    return "not a Hugging Face checkpoint (no config.json)"


def _break_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return "architecture GPT2LMHeadModel is not supported"


def _break_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "shard model-00002-of-00002.safetensors is missing"


def _break_dtype(folder):
    _safetensors(folder / "model.safetensors", {"model.embed_tokens.weight": ("I8", (4, 8), bytes(32))})
    return "tensor model.embed_tokens.weight is I8; dllama converts BF16, F16 and F32 checkpoints"


def _break_no_safetensors(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return "no *.safetensors files (found pytorch_model.bin"


def _break_missing_tensor(folder):
    # the last tensor written is the one missing: both outputs are half written when it is found
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["lm_head.weight_renamed"] = header.pop("lm_head.weight")
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    return "the checkpoint has no tensor lm_head.weight"


def _break_wrong_shape(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 95
    (folder / "config.json").write_text(json.dumps(cfg))
    return "tensor model.embed_tokens.weight has shape (96, 32), config.json implies (95, 32)"


BREAKS = [_break_not_a_checkpoint, _break_architecture, _break_missing_shard, _break_dtype,
          _break_no_safetensors, _break_missing_tensor, _break_wrong_shape]


@pytest.mark.parametrize("output", ["model.m", "model.gguf"])
@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[7:])
def test_a_bad_folder_is_one_line_and_leaves_nothing(tmp_path, breaker, output):
    folder = _copy_tiny(tmp_path)
    says = breaker(folder)
    out = tmp_path / "out"
    extra = ["--output-tokenizer", out / "model.t"] if output.endswith(".m") else []
    proc = _cli("--hf", folder, "--output-model", out / output, *extra, "--weight-type", "f32")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dllama: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr
    assert not out.exists()


def test_cli_converts_and_reports(tmp_path):
    out = tmp_path / "q.m"
    proc = _cli("--hf", TINY / "qwen3_moe", "--output-model", out, "--output-tokenizer", tmp_path / "q.t",
                "--weight-type", "q80")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out} (qwen3_moe, 2 layers, dim 32, q80")
    assert sorted(os.listdir(tmp_path)) == ["q.m", "q.t"]
    proc = _cli("--hf", TINY / "qwen3", "--output-model", tmp_path / "q.gguf", "--output-tokenizer", tmp_path / "x.t")
    assert proc.returncode == 2 and "a GGUF output carries its tokenizer" in proc.stderr


def test_qwen3_moe_m_file_without_2025_keys_runs_with_m_keys_2025(tmp_path):
    """A 2025 Qwen3-MoE `.m` stating none of keys 19-21 (auto reads such a header as Mixtral): with
    --m-keys 2025 it runs to transformers' logits."""
    from unit.test_m_keys import write_without_2025_keys

    model = C.save_checkpoint(H.build("qwen3_moe", 9, head_dim=16, rms_norm_eps=1e-5, intermediate_size=64),
                              tmp_path / "ckpt", "bfloat16")
    from dllama.errors import FormatError

    m, t = tmp_path / "model.m", tmp_path / "model.t"
    convert_hf(str(tmp_path / "ckpt"), str(m), str(t), "f32")
    write_without_2025_keys(m)
    ids = _prompt(2, model.config.vocab_size)
    with pytest.raises(FormatError, match="truncated|unexpected bytes"):
        Engine.open(str(m), str(t), nthreads=1)
    eng = Engine.open(str(m), str(t), nthreads=1, m_keys="2025")
    try:
        assert eng.spec.arch == "qwen3_moe"
        ours = eng.prefill(ids).copy()
    finally:
        eng.close()
    assert _rel(ours, _hf_logits(model, ids)) < TOL_F


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from cluster_fixtures import WorkerProcess

    w = WorkerProcess(tmp_path_factory.mktemp("worker"))
    try:
        yield w.wait_ready()
    finally:
        w.stop()


@pytest.mark.network
@pytest.mark.parametrize("name", ["mixtral-llama31", "qwen3-moe"])
def test_converted_m_on_a_root_and_a_worker_matches_transformers(tmp_path, worker, name):
    """The `.m` + `.t` of `--hf`, split over a root and a `dllama worker` on loopback (F32 buffers)."""
    from cluster_fixtures import KEY

    args, dtype, _ = SPLIT_CASES[name]
    args = dict(args)
    model = C.save_checkpoint(H.build(args.pop("kind"), 6, intermediate_size=128, **args), tmp_path / "ckpt", dtype)
    m, t = tmp_path / "model.m", tmp_path / "model.t"
    convert_hf(str(tmp_path / "ckpt"), str(m), str(t), "f32")
    assert worker.wait_idle()["state"] == "idle", worker.log()
    ids = _prompt(4, model.config.vocab_size)
    eng = Engine.open(str(m), str(t), nthreads=1, buffer_float_type="f32", workers=[worker.address], cluster_key=KEY)
    try:
        ours = eng.prefill(ids).copy()
        tok = int(np.argmax(ours))
        step = eng._forward([tok], len(ids)).copy()
    finally:
        eng.close()
    assert _rel(ours, _hf_logits(model, ids)) < TOL_F, name
    assert _rel(step, _hf_logits(model, ids + [tok])) < TOL_F, name
