"""GGUF reading and `dllama convert`, on files written by the `gguf` package's own GGUFWriter and
quantizers (the outside truth), plus the real SmolLM2 GGUF."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from dllama import quants
from dllama.errors import FormatError
from dllama.formats import convert as conv
from dllama.formats.loader import load_model

DIM, FFN, HEADS, KV, VOCAB, LAYERS = 64, 96, 4, 2, 80, 2


def llama_tensors(n_layers=LAYERS, dim=DIM, ffn=FFN, heads=HEADS, kv=KV, vocab=VOCAB, experts=0, tied=True):
    """{gguf name: f32 array in numpy (rows, cols) order} for a llama model."""
    rng = np.random.default_rng(0)
    hd = dim // heads

    def r(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    t = {"token_embd.weight": r(vocab, dim), "output_norm.weight": r(dim) + 1}
    if not tied:
        t["output.weight"] = r(vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        t.update({p + "attn_q.weight": r(heads * hd, dim), p + "attn_k.weight": r(kv * hd, dim),
                  p + "attn_v.weight": r(kv * hd, dim), p + "attn_output.weight": r(dim, heads * hd),
                  p + "attn_norm.weight": r(dim), p + "ffn_norm.weight": r(dim)})
        if experts:
            t.update({p + "ffn_gate_inp.weight": r(experts, dim), p + "ffn_gate_exps.weight": r(experts, ffn, dim),
                      p + "ffn_down_exps.weight": r(experts, dim, ffn), p + "ffn_up_exps.weight": r(experts, ffn, dim)})
        else:
            t.update({p + "ffn_gate.weight": r(ffn, dim), p + "ffn_down.weight": r(dim, ffn), p + "ffn_up.weight": r(ffn, dim)})
    return t


def write_gguf(path, tensors, types=None, arch="llama", meta=None, default=T.Q4_1):
    """Writes a GGUF with GGUFWriter; returns {gguf name: the f32 values the file now holds}."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(256)
    if "token_embd.weight" in tensors:
        dim = tensors["token_embd.weight"].shape[1]
        w.add_block_count(max(int(n.split(".")[1]) for n in tensors if n.startswith("blk.")) + 1)
        w.add_embedding_length(dim)
        ffn = next(x for n, x in tensors.items() if "ffn_down" in n).shape[-1]
        w.add_feed_forward_length(ffn)
        w.add_head_count(HEADS)
        w.add_head_count_kv(KV)
        w.add_rope_freq_base(500000.0)
        w.add_layer_norm_rms_eps(1e-5)
    for key, value in (meta or {}).items():
        getattr(w, key)(*value) if isinstance(value, tuple) else getattr(w, key)(value)
    held = {}
    for name, x in tensors.items():
        qt = (types or {}).get(name, T.F32 if x.ndim == 1 else default)
        raw = gguf.quants.quantize(x, qt)
        w.add_tensor(name, raw, raw_dtype=qt if raw.dtype == np.uint8 else None)
        held[name] = gguf.quants.dequantize(raw, qt).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


INTERNAL = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w1", "ffn_down": "w2",
            "ffn_up": "w3", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def internal(name):
    if name == "token_embd.weight":
        return "tok_embd"
    if name == "output_norm.weight":
        return "norm"
    if name == "output.weight":
        return "wcls"
    _, i, kind, _ = name.split(".")
    return f"layers.{i}.{INTERNAL[kind]}"


def test_tiny_gguf_maps_names_shapes_and_values(tmp_path):
    types = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.F16, "blk.0.attn_k.weight": T.Q4_0,
             "blk.1.ffn_up.weight": T.F32}
    held = write_gguf(tmp_path / "t.gguf", llama_tensors(), types)
    m = load_model(tmp_path / "t.gguf")
    assert m.kind == "gguf"
    s = m.spec
    assert (s.arch, s.dim, s.hidden_dim, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == \
        ("llama", DIM, FFN, LAYERS, HEADS, KV, DIM // HEADS, VOCAB)
    assert (s.rope_theta, s.norm_eps, s.seq_len, s.weight_type, s.rope_type) == (500000.0, 1e-5, 256, "q41", "llama")
    assert s.tied_embeddings and m.tensors["wcls"] is m.tensors["tok_embd"]
    want = {"token_embd.weight": "q80", "blk.0.attn_q.weight": "f16", "blk.0.attn_k.weight": "q40",
            "blk.1.ffn_up.weight": "f32", "blk.1.ffn_down.weight": "q41", "blk.0.ffn_norm.weight": "f32"}
    for name, qtype in want.items():
        assert m.tensors[internal(name)].qtype == qtype, name
    for name, x in held.items():
        t = m.tensors[internal(name)]
        assert t.shape == x.shape and not t.data.flags.writeable
        np.testing.assert_array_equal(t.to_f32(), x, err_msg=name)


def test_untied_gguf_has_its_own_wcls(tmp_path):
    write_gguf(tmp_path / "u.gguf", llama_tensors(tied=False))
    m = load_model(tmp_path / "u.gguf")
    assert not m.spec.tied_embeddings and m.tensors["wcls"] is not m.tensors["tok_embd"]


@pytest.mark.parametrize("stacked", [True, False])
def test_mixtral_experts_and_router(tmp_path, stacked):
    src = llama_tensors(experts=3)
    if not stacked:   # older Mixtral GGUFs: one 2-D tensor per expert, blk.N.ffn_gate.E.weight
        for n in [n for n in src if "_exps" in n]:
            x = src.pop(n)
            for e in range(x.shape[0]):
                src[n.replace("_exps", f".{e}")] = x[e]
    held = write_gguf(tmp_path / "mx.gguf", src, meta={"add_expert_count": 3, "add_expert_used_count": 2})
    m = load_model(tmp_path / "mx.gguf")
    assert (m.spec.arch, m.spec.n_experts, m.spec.n_active_experts) == ("mixtral", 3, 2)
    router = m.tensors["layers.1.moe_gate"]
    assert router.shape == (3, DIM)
    np.testing.assert_array_equal(router.to_f32(), held["blk.1.ffn_gate_inp.weight"])
    for e in range(3):
        for kind, w in (("ffn_gate", "w1"), ("ffn_down", "w2"), ("ffn_up", "w3")):
            want = held[f"blk.1.{kind}_exps.weight"][e] if stacked else held[f"blk.1.{kind}.{e}.weight"]
            np.testing.assert_array_equal(m.tensors[f"layers.1.experts.{e}.{w}"].to_f32(), want)


def llama3_rope_factors(head_dim, base, factor, low, high, old_ctx):
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors (rope_freqs for Llama 3.1+)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_rope_freqs_tensor_gives_llama31_scaling(tmp_path):
    src = llama_tensors(dim=256, ffn=128)   # head_dim 64, as Llama 3.2 1B
    src["rope_freqs.weight"] = llama3_rope_factors(64, 500000.0, 32.0, 1.0, 4.0, 8192)
    write_gguf(tmp_path / "l3.gguf", src)
    s = load_model(tmp_path / "l3.gguf").spec
    assert s.rope_type == "llama3.1"
    assert (s.rope_scaling_factor, s.rope_scaling_low_freq_factor, s.rope_scaling_high_freq_factor,
            s.rope_scaling_orig_max_seq_len) == (32.0, 1.0, 4.0, 8192)


def test_rope_scaling_metadata(tmp_path):
    meta = {"add_rope_scaling_type": gguf.RopeScalingType.YARN, "add_rope_scaling_factor": 4.0}
    write_gguf(tmp_path / "y.gguf", llama_tensors(), meta=meta)
    with pytest.raises(FormatError, match="rope scaling type 'yarn' is not supported"):
        load_model(tmp_path / "y.gguf")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "iq4.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((2, gguf.GGML_QUANT_SIZES[T.IQ4_NL][1]), np.uint8),
                 raw_dtype=T.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match=r"iq4\.gguf: tensor blk\.0\.ffn_down\.weight has type IQ4_NL"):
        load_model(path)


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "g.gguf", {"position_embd.weight": np.zeros((4, 32), np.float32)}, arch="gpt2")
    with pytest.raises(FormatError, match=r"g\.gguf: unsupported GGUF architecture 'gpt2'"):
        load_model(tmp_path / "g.gguf")


def test_damaged_and_missing_files(tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path, llama_tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(FormatError, match=r"t\.gguf: not a readable GGUF file"):
        load_model(path)
    src = llama_tensors()
    del src["blk.1.attn_v.weight"]
    write_gguf(tmp_path / "m.gguf", src)
    with pytest.raises(FormatError, match="lacks 1 tensor.*layers.1.wv"):
        load_model(tmp_path / "m.gguf")
    with pytest.raises(FormatError, match="model file not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(FormatError, match="is a directory"):
        load_model(tmp_path)
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(FormatError, match="not a model file"):
        load_model(tmp_path / "junk")


def q40_step(x):
    # one Q4_0 step per block (largest magnitude / 8), with room for the f16 scale
    b = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    return np.broadcast_to(b / 8 * 1.01 + 1e-6, (b.shape[0], 32)).reshape(x.shape)


def test_convert_requantizes_within_q40_tolerance(tmp_path):
    types = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.F16,
             "blk.1.ffn_up.weight": T.Q8_0}
    held = write_gguf(tmp_path / "in.gguf", llama_tensors(), types)
    out = tmp_path / "out.m"
    spec = conv.convert(str(tmp_path / "in.gguf"), str(out))
    assert spec.weight_type == "q40"
    m = load_model(out)
    assert m.kind == "dlm" and m.spec.weight_type == "q40" and not m.spec.tied_embeddings
    assert (m.spec.dim, m.spec.n_layers, m.spec.n_kv_heads, m.spec.rope_theta) == (DIM, LAYERS, KV, 500000.0)
    for name, x in held.items():
        t = m.tensors[internal(name)]
        if x.ndim == 1 or name == "token_embd.weight":
            assert t.qtype == "f32"
            np.testing.assert_array_equal(t.to_f32(), x, err_msg=name)
        else:
            assert t.qtype == "q40"
            assert np.all(np.abs(t.to_f32() - x) <= q40_step(x)), name
    # a Q4_0 source is copied, not re-quantized; the tied output matrix is written from the embedding
    g = gguf.GGUFReader(str(tmp_path / "in.gguf"))
    q = next(t for t in g.tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(m.tensors["layers.0.wq"].data, q.data.reshape(-1))
    emb = held["token_embd.weight"]
    assert np.all(np.abs(m.tensors["wcls"].to_f32() - emb) <= q40_step(emb))


def test_convert_mixtral(tmp_path):
    held = write_gguf(tmp_path / "mx.gguf", llama_tensors(experts=3),
                      meta={"add_expert_count": 3, "add_expert_used_count": 2})
    conv.convert(str(tmp_path / "mx.gguf"), str(tmp_path / "mx.m"))
    m = load_model(tmp_path / "mx.m")
    assert (m.spec.arch, m.spec.n_experts, m.spec.rope_type, m.spec.extra["dlm_key_set"]) == ("mixtral", 3, "llama", "2024")
    for e in range(3):
        for kind, w in (("ffn_gate", "w1"), ("ffn_down", "w2"), ("ffn_up", "w3")):
            x = held[f"blk.0.{kind}_exps.weight"][e]
            assert np.all(np.abs(m.tensors[f"layers.0.experts.{e}.{w}"].to_f32() - x) <= q40_step(x))
    router = held["blk.1.ffn_gate_inp.weight"]
    assert np.all(np.abs(m.tensors["layers.1.moe_gate"].to_f32() - router) <= q40_step(router))


def test_convert_other_weight_types(tmp_path):
    held = write_gguf(tmp_path / "in.gguf", llama_tensors())
    conv.convert(str(tmp_path / "in.gguf"), str(tmp_path / "f16.m"), weight_type="f16")
    m = load_model(tmp_path / "f16.m")
    x = held["blk.1.ffn_down.weight"]
    assert m.tensors["layers.1.w2"].qtype == "f16"
    np.testing.assert_array_equal(m.tensors["layers.1.w2"].to_f32(), x.astype(np.float16).astype(np.float32))


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    write_gguf(tmp_path / "in.gguf", llama_tensors())
    real, calls = quants.quantize, []

    def interrupting(qtype, x):
        calls.append(qtype)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(qtype, x)

    monkeypatch.setattr(quants, "quantize", interrupting)
    monkeypatch.setattr(conv, "_write_tokenizer", lambda model, dst: open(dst, "wb").write(b"tok"))
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(tmp_path / "in.gguf"), str(tmp_path / "o.m"), str(tmp_path / "o.t"))
    assert sorted(os.listdir(tmp_path)) == ["in.gguf"]


def test_convert_cli_errors(tmp_path, capsys):
    from dllama.cli import main

    assert main(["convert", "--model", str(tmp_path / "none.gguf"), "--output-model", str(tmp_path / "o.m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dllama: error: model file not found") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    m = load_model(smollm2_path)
    yield m
    m.close()


def test_release_keeps_the_spec(tmp_path):
    write_gguf(tmp_path / "t.gguf", llama_tensors())
    m = load_model(tmp_path / "t.gguf")
    assert m.gguf_reader is not None and "general.architecture" in m.gguf_reader.fields
    m.release()
    assert m.tensors == {} and m.gguf_reader is None and m.spec.dim == DIM


def test_smollm2_gguf_spec_and_types(smollm2):
    s = smollm2.spec
    assert (s.arch, s.n_layers, s.dim, s.hidden_dim, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == \
        ("llama", 30, 576, 1536, 9, 3, 64, 49152)
    assert (s.rope_theta, s.norm_eps, s.seq_len, s.rope_type, s.weight_type) == (100000.0, 1e-5, 8192, "llama", "q41")
    assert s.tied_embeddings and smollm2.tensors["wcls"] is smollm2.tensors["tok_embd"]
    t = smollm2.tensors
    assert t["tok_embd"].qtype == "q80" and t["tok_embd"].shape == (49152, 576)
    assert t["layers.29.w2"].qtype == "q41" and t["layers.29.w2"].shape == (576, 1536)
    assert t["layers.0.wk"].shape == (192, 576) and t["norm"].qtype == "f32"
    assert len(t) == 2 + 1 + 30 * 9


@pytest.mark.slow
def test_convert_smollm2(smollm2_path, smollm2, tmp_path, reference):
    conv.convert(smollm2_path, str(tmp_path / "s.m"), str(tmp_path / "s.t"))
    m = load_model(tmp_path / "s.m")
    assert (m.spec.n_layers, m.spec.dim, m.spec.n_heads, m.spec.n_kv_heads, m.spec.weight_type) == (30, 576, 9, 3, "q40")
    for name, t in m.tensors.items():
        x = smollm2.tensors[name].to_f32()
        if t.qtype == "f32":
            np.testing.assert_array_equal(t.to_f32(), x, err_msg=name)
        else:
            # from Q4_1 (Q8_0 for wcls): one Q4_0 step of the value read back
            assert np.all(np.abs(t.to_f32() - x) <= q40_step(x)), name
    # the .t holds the GGUF's vocabulary: it decodes llama.cpp's ids to llama.cpp's text. (Encoding
    # can differ: a .t has scores, not GPT-2 merges and pre-split; that is the format's limit.)
    from dllama.formats.dlt import read_t
    from dllama.tokenizer import Tokenizer

    t = read_t(str(tmp_path / "s.t"))
    assert len(t.tokens) == 49152 and t.bos_id == 1 and 2 in t.eos_ids and "im_start" in t.chat_template
    tok = Tokenizer.from_t(str(tmp_path / "s.t"))
    for case in reference["tokenizer_cases"]:
        assert tok.decode(case["ids"]) == case["decoded"], case["text"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_convert_killed_midway_leaves_nothing(smollm2_path, tmp_path, sig, status):
    proc = subprocess.Popen([sys.executable, "-m", "dllama", "convert", "--model", smollm2_path, "--output-model",
                             str(tmp_path / "s.m"), "--output-tokenizer", str(tmp_path / "s.t")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # wait until the model's temporary exists (the tokenizer's is written first)
    while not any(n.startswith(".s.m.") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait(60) == status
    assert os.listdir(tmp_path) == []


def test_tensors_of_another_architecture_are_refused(tmp_path):
    """The schema decides which tensors an architecture has: Qwen3's q/k norms in a llama file, a qwen3
    file without them, or a norm of the wrong width are one-line errors, not silently ignored."""
    src = llama_tensors()
    src["blk.0.attn_q_norm.weight"] = np.ones(DIM // HEADS, np.float32)
    write_gguf(tmp_path / "extra.gguf", src)
    with pytest.raises(FormatError, match=r"extra\.gguf: unexpected tensor layers\.0\.q_norm for architecture llama"):
        load_model(tmp_path / "extra.gguf")
    write_gguf(tmp_path / "qwen3.gguf", llama_tensors(), arch="qwen3")
    with pytest.raises(FormatError, match=r"qwen3\.gguf: GGUF lacks 4 tensor.*layers\.0\.q_norm"):
        load_model(tmp_path / "qwen3.gguf")
    src = llama_tensors()
    src["blk.1.ffn_norm.weight"] = np.ones(DIM + 1, np.float32)
    write_gguf(tmp_path / "norm.gguf", src)
    with pytest.raises(FormatError, match=r"layers\.1\.ffn_norm has shape \(65,\), metadata implies \(64,\)"):
        load_model(tmp_path / "norm.gguf")
